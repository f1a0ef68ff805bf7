"""The PNG plots of a run's metrics (metrics_logging.write_plots): one line per modality,
balance weights only when logged, and a gs:// workdir (the in-memory bucket of test_workdir).
m2omni-train writing them at the end of a run: tests/test_train.py (periodic eval test)."""
import io

import numpy as np
from PIL import Image

from m2omni_jax.training.metrics_logging import MetricLogger, write_plots
from test_workdir import bucket  # noqa: F401  (the fixture)

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


def log_run(workdir, weights: bool) -> None:
    with MetricLogger(workdir, 6, log_every=1, use_tqdm=False) as logger:
        for step in range(1, 7):
            metrics = {"loss": 3.0 / step, "loss/text": 4.0 / step, "loss/image": 2.0 / step}
            if weights:
                metrics.update({"balance/weight/text": 1.0 + 0.1 * step, "balance/weight/image": 1.0 - 0.1 * step})
            logger.log(step, metrics)
            if weights and step % 3 == 0:
                logger.record(step, {"val_loss/text": 3.5 / step, "val_loss/image": 2.2 / step})


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (700, 400)
    return np.asarray(image.convert("RGB")).reshape(-1, 3)


def has_colour(rgb: np.ndarray, colour) -> bool:
    return int(np.all(np.abs(rgb.astype(int) - colour) <= 8, axis=1).sum()) > 50  # a line, not a legend swatch


def test_losses_and_balance_weights_are_plotted(tmp_path, capsys):
    log_run(tmp_path, weights=True)
    capsys.readouterr()
    written = write_plots(tmp_path)
    assert [p.name for p in written] == ["losses.png", "balance_weights.png"]
    assert capsys.readouterr().out == ""  # quiet: the files are the output
    for path in written:
        rgb = pixels(path.read_bytes())
        assert has_colour(rgb, C0) and has_colour(rgb, C1)  # image and text each drew a line


def test_without_balance_weights_only_the_losses(tmp_path):
    log_run(tmp_path, weights=False)
    assert [p.name for p in write_plots(tmp_path)] == ["losses.png"]
    assert not (tmp_path / "plots" / "balance_weights.png").exists()


def test_plots_of_a_bucket_workdir(bucket):  # noqa: F811
    log_run("gs://bucket/run", weights=True)
    write_plots("gs://bucket/run")
    pixels(bucket["/bucket/run/plots/losses.png"].getvalue())
    assert "/bucket/run/plots/balance_weights.png" in bucket
