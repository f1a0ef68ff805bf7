"""HiFi-GAN vocoder (models/hifigan.py) on the built-in speech (eSpeak NG) of the tiny config.

    nice -n 5 m2omni-train-vocoder --config=configs/experiments/hifigan_tiny.py --workdir=/tmp/hifigan

Then speak with it: config.speech_tokenizer.vocoder = "hifigan", .vocoder_workdir = "/tmp/hifigan".
Headline: `<workdir>/vocoder_eval.json` (MCD of HiFi-GAN vs Griffin-Lim on held-out clips' own mel).
"""
import ml_collections

from configs import tiny


def get_config():
    config = tiny.get_config()  # its data: 3,000 / 200 spoken records, one clip each
    config.hifigan = ml_collections.ConfigDict(dict(
        steps=2000, batch_size=8, segment_frames=32, peak_lr=2e-4, lr_decay=0.999, lr_decay_steps=100,
        adversarial_from=0, num_train_clips=3000, num_eval_clips=8, eval_wavs=4, griffin_lim_iters=32,
        log_every=50, checkpoint_every=500,
        # Smaller than V3 for 2 CPU cores: 64 channels at the first stage, narrow discriminators.
        model=dict(initial_channels=64, period_channels=(8, 16, 32, 32), scale_channels=(16, 16, 32, 32, 64, 64, 64),
                   scale_groups=(1, 4, 16, 16, 16, 16, 1))))
    return config
