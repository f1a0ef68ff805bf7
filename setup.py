"""m2omni_jax: a JAX/Flax reimplementation of M2-omni (arXiv 2502.18778)."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "array-record>=0.7",
    "tensorflow-datasets>=4.9.8",
    "sentencepiece>=0.2",
    "ml-collections>=1.0",
    "absl-py",
    "numpy",
    "pillow",
    "tqdm",
    "tensorboardX",
    "protobuf",
    "msgpack",
    "soxr",  # resampling to 16 kHz
    "espeakng-loader>=0.2.4",  # offline speech for the built-in data set
    "jiwer",  # ASR word error rate
    "librosa",  # Griffin-Lim phase recovery of the default vocoder (models/vocoder.py)
    "tokenizers",  # a Hugging Face checkpoint's tokenizer.json (interop/hf_tokenizer.py)
    "matplotlib",  # the PNG loss / balance-weight plots m2omni-train writes (training/metrics_logging.py)
    "threadpoolctl",  # one BLAS thread for the input pipeline's numpy work (data/pipeline.py)
    "importlib_resources",  # tfds 4.9.x imports it when preparing a builder (tensorflow/datasets#11212)
    "gcsfs",  # gs:// workdirs and data directories through etils.epath (without TensorFlow)
]

EXTRAS = {
    # tensorflow-cpu: tfds.testing.mock_data builds the real registered builders' Image/Audio
    # features with it (tests/test_sources.py); the framework itself reads TFDS without it.
    # torch + transformers: the Hugging Face parity tests (tests/test_hf_interop.py); 2.13.0 is
    # a CPU build (any other torch pulls several GB of CUDA wheels). nbclient: tests/test_notebooks.py.
    # gcp-storage-emulator: a local gs:// bucket for tests/test_bucket_run.py.
    "test": ["pytest>=8", "pytest-xdist", "kaldi-native-fbank", "tensorflow-cpu", "torch==2.13.0", "transformers",
             "nbclient", "nbformat", "ipykernel", "gcp-storage-emulator"],
    # benchmarks/peers/: the same models in PyTorch / transformers, measured side by side.
    "peers": ["torch==2.13.0", "transformers"],
    "experiments": ["matplotlib", "optuna"],  # benchmarks/balance_comparison.py plots; fixnorm_vs_tpe.py: TPE
    "tpu": ["jax[tpu]"],
    "cuda": ["jax[cuda12]"],
}

setuptools.setup(
    name="m2omni_jax",
    version="0.1.0",
    description="M2-omni omni-modal LLM in JAX/Flax: training and inference framework",
    # `configs` is installed too, so experiment files can `from configs import base`.
    packages=setuptools.find_packages(include=["m2omni_jax", "m2omni_jax.*", "configs", "configs.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "m2omni-train=m2omni_jax.main:run",
        "m2omni-eval=m2omni_jax.evaluate:run",
        "m2omni-generate=m2omni_jax.generate:run",
        "m2omni-chat=m2omni_jax.chat_cli:run",
        "m2omni-prepare-data=m2omni_jax.prepare_data:run",
        "m2omni-calibrate=m2omni_jax.calibrate:run",
        "m2omni-tune-fixnorm=m2omni_jax.tune_fixnorm:run",
        "m2omni-align=m2omni_jax.align:run",
        "m2omni-import=m2omni_jax.import_hf:run",
        "m2omni-pretrain-tower=m2omni_jax.experiments.shapes_world.tower:run",
        "m2omni-train-speech-tokenizer=m2omni_jax.train_speech_tokenizer:run",
        "m2omni-train-vocoder=m2omni_jax.train_vocoder:run",
        "m2omni-aot=m2omni_jax.aot:run",
    ]},
)
