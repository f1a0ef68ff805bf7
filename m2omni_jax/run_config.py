"""The run's config, typed: `RunConfig.of(config_dict)` turns the `ml_collections` config a
command is given into frozen dataclasses, once, at the command's entry; every section is
checked there (unknown or missing fields, types, the model sections' own rules) with an
error naming `config.<field>`. Code below the commands reads `config.train.steps` as before,
never mutates a config (`config_fields.replace` makes a changed copy) and gets sections
passed down (`make_optimizer(config.opt, ...)`).

The defaults live in `configs/base.py` only; these classes are the schema. Sections the
framework does not know (a command's own, e.g. `alignment`, or an experiment's, e.g.
`shapes_world`) are kept as frozen free-form `Section`s in `RunConfig.sections`.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import typing
from typing import Any, Mapping

from m2omni_jax.config_fields import ConfigError, Section, as_dict, freeze, replace
from m2omni_jax.models.audio import AudioConfig
from m2omni_jax.models.image_head import ImageOutputConfig
from m2omni_jax.models.llm import LLMConfig
from m2omni_jax.models.omni import MODEL_KINDS, ConnectorConfig
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.training.optimizers import mm1_opt_fields

frozen = dataclasses.dataclass(frozen=True)


@frozen
class ModelAudioConfig(AudioConfig):
    """config.model.audio: the audio tower's fields, whether it is on, and its token scale."""
    enabled: bool = False
    output_scale: float = 1.0  # multiplies the L2-normalised audio tokens


@frozen
class ModelConfig:
    kind: str  # MODEL_KINDS
    llm: LLMConfig
    vision: VisionConfig
    connector: ConnectorConfig
    audio: ModelAudioConfig
    image_head: ImageOutputConfig = ImageOutputConfig()  # the image output head (off unless enabled)

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"config.model.kind={self.kind!r}; use one of {MODEL_KINDS}")


@frozen
class DcnMeshConfig:
    """config.mesh.dcn: slices each mesh axis spans (multislice; parallel/sharding.py)."""
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@frozen
class MeshConfig:
    data: int
    fsdp: int
    expert: int
    tensor: int
    dcn: DcnMeshConfig = DcnMeshConfig()


@frozen
class TokenizerConfig:
    path: str
    vocab_size: int
    cache_dir: str
    audio_codes: int = 0  # <audio_k> tokens appended to the text vocabulary

    def __post_init__(self):
        if not isinstance(self.audio_codes, int) or self.audio_codes < 0:
            raise ValueError(f"config.tokenizer.audio_codes={self.audio_codes!r} must be an integer >= 0")


@frozen
class VisionDataConfig:
    image_min_pixels: int
    image_max_pixels: int
    image_side: int
    video_min_pixels: int
    video_max_pixels: int
    video_src_fps: float
    video_fps: float
    video_min_frames: int
    video_max_frames: int
    patches_per_row: int
    pixel_norm: str


@frozen
class AudioDataConfig:
    clips_per_row: int
    cmvn_file: str
    cmvn_samples: int


@frozen
class DataConfig:
    dir: str
    seed: int
    split: str
    seq_len: int
    packing_bins: int
    num_workers: int
    read_threads: int
    shards: int
    loss_averaging: str
    pack_pairs: tuple  # modality names: their consecutive samples join into one sequence
    sources: Mapping[str, Section]  # name -> {kind, ...}: each source kind checks its own fields
    vision: VisionDataConfig
    audio: AudioDataConfig
    mixture: str
    modality_weights: Mapping[str, float]


@frozen
class TrainConfig:
    steps: int
    batch_size: int
    log_every: int
    z_loss_weight: float
    loss_weights: Mapping[str, float]
    peak_flops_per_device: float
    max_nonfinite_steps: int
    heldout_batches: int
    heldout_batch_size: int


@frozen
class FixNormConfig:
    scale_invariant: tuple
    classifier: tuple
    tau: Any  # float | None
    per_channel: bool
    classifier_per_class: bool
    stacked: tuple


@frozen
class OptConfig:
    name: str
    peak_lr: float | str  # "mm1" until resolve_lr_law
    warmup_steps: int
    decay: str
    final_fraction: float
    b1: float
    b2: float
    eps: float
    mu_dtype: str
    grad_clip: float
    weight_decay: float
    weight_decay_convention: str
    no_decay: tuple
    param_groups: tuple
    lr_multipliers: Mapping[str, float]
    frozen: tuple
    fixnorm: FixNormConfig
    lr_law: str = ""  # set by resolve_lr_law: the law peak_lr and weight_decay came from


@frozen
class EvalConfig:
    num_samples: int
    batch_size: int
    max_new_tokens: int
    num_speech_samples: int
    prompt_len: int
    every: int
    periodic_num_samples: int
    num_tts_samples: int = 50  # held-out TTS sentences (modality "speech_gen") spoken and scored
    tts_wavs: int = 4  # of them written to <workdir>/tts_wavs


@frozen
class CheckpointConfig:
    every: int
    keep: int
    async_save: bool


@frozen
class StepBalanceConfig:
    alpha: float
    calibration_file: str
    equal_weights: bool


@frozen
class DynamicBalanceConfig:
    window: int
    temperature: float
    momentum: float
    eps: float
    interval_steps: int
    val_batches: int
    val_batch_size: int


@frozen
class BalanceConfig:
    strategy: str
    modalities: tuple
    step: StepBalanceConfig
    dynamic: DynamicBalanceConfig


@frozen
class RunConfig:
    seed: int
    model: ModelConfig
    mesh: MeshConfig
    sharding_rules: tuple
    tokenizer: TokenizerConfig
    data: DataConfig
    train: TrainConfig
    opt: OptConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    balance: BalanceConfig
    init_from: str = ""  # a previous run's workdir (relative to this one) whose parameters start this run
    init_from_include: tuple = ()  # parameter path regexes init_from loads; empty: all that fit
    stage: str = ""  # the training stage a stage config runs (configs/stages/)
    sections: Mapping[str, Section] = dataclasses.field(default_factory=dict)  # commands' / experiments' own

    @classmethod
    def of(cls, config) -> "RunConfig":
        """The typed, checked config (a RunConfig is returned as it is)."""
        if isinstance(config, RunConfig):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        known = {f.name for f in dataclasses.fields(cls)} - {"sections"}
        sections = {k: values.pop(k) for k in list(values) if k not in known}
        for name, value in sections.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"config.{name}={value!r} is not a field of the framework's config "
                                  f"(configs/base.py; known: {sorted(known)}) nor a section")
        values = _audio_width_default(values)
        try:
            run = _build(cls, values, "config")
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # the model sections' own checks
            raise ConfigError(str(e)) from e
        return resolve_lr_law(dataclasses.replace(run, sections=Section(sections, "config")))

    def section(self, name: str) -> Section:
        """A command's or experiment's own section; a clear error when the config has none."""
        if name not in self.sections:
            raise ConfigError(f"config.{name} is missing: this command needs its section "
                              f"(configs have {sorted(self.sections)})")
        return self.sections[name]


LR_LAWS = ("mm1",)


def resolve_lr_law(run: RunConfig) -> RunConfig:
    """`opt.peak_lr="mm1"`: peak LR and weight decay from MM1's law for the LLM's size
    (optimizers.mm1_opt_fields); any other string is an error naming the field."""
    peak_lr = run.opt.peak_lr
    if not isinstance(peak_lr, str):
        if isinstance(peak_lr, bool) or not isinstance(peak_lr, (int, float)):
            raise ConfigError(f"config.opt.peak_lr={peak_lr!r} must be a number or one of {LR_LAWS}")
        return run
    if peak_lr not in LR_LAWS:
        raise ConfigError(f"config.opt.peak_lr={peak_lr!r} must be a number or one of {LR_LAWS}")
    fields = {f"opt.{k}": v for k, v in mm1_opt_fields(run.model.llm).items()}
    return replace(run, **fields, **{"opt.lr_law": peak_lr})


def _audio_width_default(values: dict) -> dict:
    """config.model.audio.out_width defaults to the LLM width (the tower writes LLM tokens)."""
    model = values.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("audio"), Mapping) and "llm" in model:
        audio = dict(model["audio"])
        audio.setdefault("out_width", model["llm"].get("width"))
        values = {**values, "model": {**model, "audio": audio}}
    return values


def _build(cls, values: Mapping, path: str):
    """cls(**values), recursing into nested dataclasses; missing and unknown fields named."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}={values!r} must be a section with the fields of {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{path} has unknown fields {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}.{name} is missing (configs/base.py sets every field)")
            continue
        kwargs[name] = _convert(hints[name], values[name], f"{path}.{name}")
    return cls(**kwargs)


def _convert(hint, value, path: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is tuple or origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{path}={value!r} must be a tuple")
        return tuple(freeze(v, path) for v in value)
    if origin in (collections.abc.Mapping, dict) or hint in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r} must be a mapping")
        return Section(value, path)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{path}={value!r} must be of type {hint.__name__}")
    return value
