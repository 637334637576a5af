"""Any digit picture -> a 28x28 MNIST-like image: the one preprocessing of ``vitbn predict`` and ``vitbn serve``.

MNIST's digits were size-normalized to fit a 20x20 box (keeping their aspect ratio, anti-aliased) and centered in
a 28x28 field by their center of mass (LeCun et al.). A drawing or a photo is brought to that form in six steps:

1. grayscale (ITU-R 601 luma of RGB; a transparent pixel counts as background);
2. polarity: MNIST ink is bright on a dark background, so the image is inverted when its background is light
   (the background is the median of the border pixels);
3. the background level is subtracted and the ink stretched to 0..255; ink fainter than ``INK_THRESHOLD`` of the
   strongest is set to 0, so that paper texture and JPEG noise neither grow the bounding box nor move the center;
4. crop to the ink's bounding box;
5. scale so that the longer side is 20 pixels (Lanczos, i.e. anti-aliased), the shorter side in proportion;
6. paste into a black 28x28 field so that the center of mass of the ink falls on pixel (14, 14), by an integer
   shift (the measured mean center of mass of the MNIST test images is (13.99, 14.01) in row, column pixel
   indices, each within +-0.5 of 14).

A blank picture (no ink after step 3) raises ``BlankImageError``; a file that is not an image, ``ImageError``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from vitbn.errors import UserError

FIELD = 28  # output side, pixels
BOX = 20  # the digit's longer side after scaling
CENTER = 14.0  # where the center of mass lands (row, column pixel index)
INK_THRESHOLD = 0.1  # ink below this fraction of the strongest pixel is background
MIN_CONTRAST = 16  # an image whose ink rises less than this over its background (0..255) is blank
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# The largest picture decoded, read from the header before any pixel is: 2048x2048 (a phone photo scaled down by
# the page is far smaller). Decoding one of that size holds at most ~4 Mi pixels x (4 bytes RGBA + 8 float64),
# so a small file that declares a huge canvas (a "decompression bomb") is refused instead of taking gigabytes.
MAX_PIXELS = 2048 * 2048


class ImageError(UserError):
    """The bytes or the file are not a readable image."""


class BlankImageError(ImageError):
    """The image holds no ink: nothing to classify."""


class ImageTooLargeError(ImageError):
    """The image declares more than ``MAX_PIXELS`` pixels: refused before decoding."""


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """PNG/JPEG/... bytes -> a (H, W) float64 grayscale array in 0..255 (transparent pixels are background).

    Raises:
        ImageTooLargeError: the header declares more than ``MAX_PIXELS`` pixels (nothing is decoded).
        ImageError: the bytes are not an image that Pillow can decode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the limit below is lower, and says so
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
        with img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageTooLargeError(
                    f"{source} is {width}x{height} pixels; the limit is {MAX_PIXELS:,} pixels (e.g. 2048x2048)"
                )
            img.load()
            return to_gray(np.asarray(img.convert("RGBA") if _has_alpha(img) else img.convert("RGB")))
    except Image.DecompressionBombError:  # Pillow's own, far higher limit, checked as it opens
        raise ImageTooLargeError(f"{source} declares too many pixels; the limit is {MAX_PIXELS:,}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{source} is not an image in a format Pillow reads (PNG, JPEG, ...)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # a truncated or corrupt file of a known format
        raise ImageError(f"{source} is a corrupt image ({type(exc).__name__}: {exc})") from None


def _has_alpha(img) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def to_gray(pixels: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W) float64 luma. With an alpha channel, transparent
    pixels take the background's value: the median of the opaque border pixels; when the border is transparent
    (ink drawn on a transparent canvas), the opposite of the ink: white behind dark ink, black behind light ink."""
    a = np.asarray(pixels, dtype=np.float64)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return a
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"an image must be (H, W) or (H, W, 1|3|4), not {tuple(pixels.shape)}")
    gray = a[..., :3] @ np.array([0.299, 0.587, 0.114])
    if a.shape[2] == 4:
        alpha = a[..., 3] / 255.0
        opaque_border = _border(gray)[_border(alpha) > 0.5]
        if opaque_border.size:
            ground = float(np.median(opaque_border))
        else:  # the ink is whatever is opaque: put it on a ground it stands out from
            opaque = gray[alpha > 0.5]
            ground = 255.0 if opaque.size and float(np.median(opaque)) <= 127.5 else 0.0
        gray = alpha * gray + (1 - alpha) * ground
    return gray


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def ink(gray: np.ndarray) -> np.ndarray:
    """Steps 2-3: bright ink on 0, stretched to 0..255, faint pixels zeroed. Raises BlankImageError."""
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise ImageError(f"an image must be a non-empty 2-D array, not shape {gray.shape}")
    background = float(np.median(_border(gray)))
    if background > 127.5:  # dark ink on a light ground
        gray, background = 255.0 - gray, 255.0 - background
    rise = np.clip(gray - background, 0.0, None)
    peak = float(rise.max())
    if peak < MIN_CONTRAST:
        raise BlankImageError("the image is blank: no ink stands out from its background")
    out = rise * (255.0 / peak)
    out[out < INK_THRESHOLD * 255.0] = 0.0
    return out


def fit_box(digit: np.ndarray, box: int = BOX) -> np.ndarray:
    """Steps 4-5: crop to the ink's bounding box and scale the longer side to ``box`` (Lanczos)."""
    from PIL import Image

    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    crop = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL takes (width, height)
    scaled = Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(scaled, dtype=np.float64), 0.0, 255.0)  # Lanczos overshoots at sharp edges


def center_of_mass(a: np.ndarray) -> tuple[float, float]:
    """(row, column) of the intensity-weighted mean pixel index."""
    total = a.sum()
    return float((a.sum(axis=1) * np.arange(a.shape[0])).sum() / total), float(
        (a.sum(axis=0) * np.arange(a.shape[1])).sum() / total
    )


def center_in_field(digit: np.ndarray, field: int = FIELD, center: float = CENTER) -> np.ndarray:
    """Step 6: ``digit`` pasted into a zero (field, field) array, shifted by whole pixels so that its center of
    mass lands on (center, center); a part pushed over the edge is cut off (only for very lopsided digits)."""
    cy, cx = center_of_mass(digit)
    top, left = round(center - cy), round(center - cx)
    out = np.zeros((field, field))
    h, w = digit.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, field), min(left + w, field)
    out[r0:r1, c0:c1] = digit[r0 - top : r1 - top, c0 - left : c1 - left]
    return out


def to_mnist(image: np.ndarray, field: int = FIELD) -> np.ndarray:
    """A (H, W[, C]) picture of one digit (any size, any polarity) -> (field, field) uint8, MNIST-like.

    Raises:
        BlankImageError: no ink.
        ImageError: not a 2-D image.
    """
    digit = fit_box(ink(to_gray(image)), box=round(field * BOX / FIELD))
    return np.rint(center_in_field(digit, field, center=field / 2)).astype(np.uint8)


def list_images(paths: list[str | Path]) -> list[Path]:
    """The image and ``.npz`` files named, folders expanded to theirs (sorted).

    Raises:
        UserError: a path that does not exist, a folder with no image files.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npz"))
            if not files:
                raise UserError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}, .npz)")
            out += files
        elif not path.is_file():
            raise UserError(f"image {path} does not exist")
        else:
            out.append(path)
    return out


def load_images(path: Path) -> list[tuple[str, np.ndarray]]:
    """The named (H, W) or (H, W, C) arrays of one file: an image, or a ``.npz`` whose arrays are each one image
    (H, W) or a stack (N, H, W) / (N, H, W, C), named ``file:key[i]``. Raises ImageError if unreadable."""
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    return [(str(path), decode_image(path.read_bytes(), str(path)))]


def read_images(paths: list[str | Path]) -> list[tuple[str, np.ndarray]]:
    """``load_images`` of every file of ``list_images(paths)``."""
    return [named for path in list_images(paths) for named in load_images(path)]


def _read_npz(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise ImageError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    out = []
    for key, a in arrays.items():
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4) and a.shape[0] > 4):
            out.append((f"{path}:{key}", a))
        elif a.ndim in (3, 4):
            out += [(f"{path}:{key}[{i}]", a[i]) for i in range(a.shape[0])]
        else:
            raise ImageError(f"{path}:{key} has shape {a.shape}; expected (H, W), (N, H, W) or (N, H, W, C)")
    return out
