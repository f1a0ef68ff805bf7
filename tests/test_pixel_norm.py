"""clip_centered pixel normalisation: the background goes to zero whatever the objects are."""
import numpy as np

from m2omni_jax.data import image_preprocessing as ip
from m2omni_jax.data import media
from m2omni_jax.experiments.shapes_world import world as sw


def centered_patches(color: str) -> np.ndarray:
    scene = sw.sample_scene(np.random.default_rng(0), num_objects=1, size=(112, 112),
                            background={"kind": "solid", "color": "cream"})
    scene["objects"][0].update(color=color, size="large")
    patches, _ = ip.preprocess_image(sw.render_scene(scene), 56 * 56, 115 * 115)
    return media.center_colors(patches)


def test_background_patches_do_not_change_with_the_object_colour():
    red, blue = centered_patches("red"), centered_patches("blue")
    background = np.all(np.abs(red) < 1e-6, axis=1)
    assert background.mean() > 0.5  # most patches are pure background, and they are exactly 0
    np.testing.assert_array_equal(red[background], blue[background])
    assert np.abs(red[~background] - blue[~background]).max() > 1.0  # the object's patches differ


def test_center_colors_zeroes_each_channels_median():
    patches = np.random.default_rng(1).normal(size=(8, 3 * 2 * 14 * 14)).astype(np.float32) + 5.0
    by_channel = media.center_colors(patches).reshape(8, 3, -1)
    np.testing.assert_allclose(np.median(np.moveaxis(by_channel, 1, 0).reshape(3, -1), axis=1), 0, atol=1e-5)
