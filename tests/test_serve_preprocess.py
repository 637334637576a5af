"""The demo's MNIST preprocessing: each step against a hand computation, and a real digit round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vitbn.serve.preprocess import (
    BlankImageError,
    ImageError,
    center_in_field,
    center_of_mass,
    decode_image,
    fit_box,
    ink,
    read_images,
    to_gray,
    to_mnist,
)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _l_stroke() -> np.ndarray:
    """Dark ink (40) on a light ground (240), an "L" 20 rows x 6 columns at rows 12-31, columns 30-35, and a
    faint speck (230) that must be dropped as paper noise."""
    a = np.full((50, 60), 240, np.uint8)
    a[12:32, 30:32] = 40  # the bar: 20 x 2
    a[30:32, 32:36] = 40  # the foot: 2 x 4
    a[45, 5] = 230
    return a


def test_l_stroke_matches_the_hand_computed_field():
    # By hand: inverted, the ground is 15 and the ink 215; stretched, the ink is 255, the speck 10 * 255/200 =
    # 12.75 < 25.5 (the threshold) -> 0. The crop is the 20 x 6 L, already 20 tall: no scaling. Center of mass:
    # rows (2 * (0 + ... + 19) + 4 * (18 + 19)) / 48 = 528 / 48 = 11.0; columns (20 * 1 + 2 * (2+3+4+5)) / 48 = 1.0.
    # Shift: 14 - 11 = 3 rows, 14 - 1 = 13 columns.
    expected = np.zeros((28, 28), np.uint8)
    expected[3:23, 13:15] = 255
    expected[21:23, 15:19] = 255
    np.testing.assert_array_equal(to_mnist(_l_stroke()), expected)
    np.testing.assert_array_equal(to_mnist(decode_image(_png(_l_stroke()))), expected)


def test_steps_one_by_one():
    a = _l_stroke().astype(float)
    stretched = ink(a)
    assert stretched.max() == pytest.approx(255) and stretched[45, 5] == 0 and np.count_nonzero(stretched) == 48
    np.testing.assert_allclose(ink(255 - a), stretched)  # the same ink whatever the polarity
    block = np.zeros((30, 30))
    block[3:13, 7:11] = 200.0  # 10 x 4 -> 20 x 8: a uniform block scales to a uniform block
    scaled = fit_box(block)
    assert scaled.shape == (20, 8)
    np.testing.assert_allclose(scaled, 200.0, rtol=1e-5)
    assert center_of_mass(scaled) == pytest.approx((9.5, 3.5))
    field = center_in_field(scaled)
    assert center_of_mass(field) == pytest.approx((14.0 - 0.5, 14.0 - 0.5))  # round(4.5) = 4: half a pixel off
    assert field.sum() == pytest.approx(scaled.sum())


def test_rgb_and_alpha_are_grayscale_with_transparent_ground():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 2] = (255, 0, 0)
    np.testing.assert_allclose(to_gray(rgb)[1, 2], 0.299 * 255)
    rgba = np.zeros((5, 5, 4), np.uint8)  # white ink on a transparent ground (an alpha-only canvas)
    rgba[2, 2] = (255, 255, 255, 255)
    gray = to_gray(rgba)
    assert gray[2, 2] == pytest.approx(255) and gray[0, 0] == 0


def test_mnist_digit_is_nearly_a_fixed_point(data_root):
    from vitbn.data import load_dataset

    images = load_dataset("mnist", data_root).test.images[:50, 0].numpy()
    diffs = [np.abs(to_mnist(x).astype(int) - x).mean() for x in images]
    assert np.mean(diffs) < 3.0, np.mean(diffs)  # MNIST was made this way; resampling costs a little


def test_blank_and_corrupt_images_are_refused_in_one_line():
    with pytest.raises(BlankImageError, match="blank"):
        to_mnist(np.zeros((28, 28), np.uint8))
    with pytest.raises(BlankImageError, match="blank"):
        to_mnist(np.full((40, 40), 250, np.uint8))
    with pytest.raises(ImageError, match="not an image in a format"):
        decode_image(b"not an image", "x.png")
    with pytest.raises(ImageError, match="corrupt image"):
        decode_image(_png(_l_stroke())[:60], "cut.png")


def test_read_images_from_files_npz_and_folders(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(_l_stroke()))
    stack = np.zeros((3, 28, 28), np.uint8)
    np.savez(tmp_path / "b.npz", images=stack, one=np.zeros((28, 28), np.uint8))
    (tmp_path / "notes.txt").write_text("skipped")
    named = read_images([tmp_path])
    assert [n.split("/")[-1] for n, _ in named] == [
        "a.png",
        "b.npz:images[0]",
        "b.npz:images[1]",
        "b.npz:images[2]",
        "b.npz:one",
    ]
    np.testing.assert_array_equal(named[0][1], _l_stroke().astype(float))
    from vitbn.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        read_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        read_images([tmp_path / "empty"])
    (tmp_path / "bad.npz").write_bytes(b"PK not really")
    with pytest.raises(ImageError, match="not a readable .npz"):
        read_images([tmp_path / "bad.npz"])
