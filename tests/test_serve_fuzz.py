"""Bounded resources for every input of the demo: a property-based test (Hypothesis) of the preprocessing that
``vitbn predict`` and ``vitbn serve`` share, and of ``POST /api/predict``.

Inputs: random bytes; real images that Pillow writes (PNG, GIF, BMP, TIFF, WebP, JPEG) of random size (1-64 px a
side), mode (1, L, LA, P with and without transparency, RGB, RGBA, I;16, I, F), frame count (1-3) and EXIF
orientation, cut off at a random byte or not; and PNG headers that declare up to 100000 x 100000 pixels over a few
bytes of data.

Bounds checked for each input: exactly one of two outcomes, a prediction (a 28x28 uint8 model input; from the API,
HTTP 200 with the classes' probabilities) or a one-line error (``ImageError``, a ``UserError``; from the API, 400,
413 or 422 with ``{"error": "<one line>"}``); within ``SECONDS`` of wall time, and with a peak of ``PEAK_MIB`` of
Python and NumPy memory (``tracemalloc``). Pillow's own pixel buffer is not traced; it is bounded by the header
check (``MAX_PIXELS`` pixels, at most 4 bytes each) that ``test_serve_limits`` measures in a fresh process.
The whole file runs in well under 60 seconds on 2 cores.
"""

from __future__ import annotations

import io
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from imagebytes import bomb_png
from vitbn.errors import UserError
from vitbn.serve import Predictor
from vitbn.serve.app import create_app
from vitbn.serve.preprocess import decode_image, to_mnist

SECONDS = 5.0  # per input, generous for a loaded 2-core machine: a 64x64 image takes milliseconds
PEAK_MIB = 64  # per input; decoding a MAX_PIXELS image would need ~160 MiB of float64, a 64x64 one ~0.1 MiB
SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)
pytestmark = pytest.mark.filterwarnings("ignore:Tag data larger than file")  # Pillow on a cut TIFF: expected

MODES = ["1", "L", "LA", "P", "PT", "RGB", "RGBA", "I;16", "I", "F"]
FORMATS = {  # the modes each format writes
    "PNG": {"1", "L", "LA", "P", "PT", "RGB", "RGBA", "I;16"},
    "GIF": {"L", "P", "PT"},
    "BMP": {"1", "L", "P", "RGB"},
    "TIFF": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F"},
    "WEBP": {"RGB", "RGBA"},
    "JPEG": {"L", "RGB"},
}


@st.composite
def image_files(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(sorted(FORMATS[fmt])))
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    frames = draw(st.integers(1, 3)) if fmt in ("PNG", "GIF", "WEBP", "TIFF") else 1
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    images = [_image(rng, mode, w, h) for _ in range(frames)]
    kwargs: dict = {"format": fmt}
    if frames > 1:
        kwargs.update(save_all=True, append_images=images[1:])
    if draw(st.booleans()) and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))  # Orientation: 1-8 valid, the others not
        kwargs["exif"] = exif
    buf = io.BytesIO()
    images[0].save(buf, **kwargs)
    data = buf.getvalue()
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated, anywhere
    return data


def _image(rng: np.random.Generator, mode: str, w: int, h: int) -> Image.Image:
    if mode == "F":
        return Image.fromarray(rng.normal(0, 1000, (h, w)).astype(np.float32), "F")
    if mode in ("I", "I;16"):
        return Image.fromarray(rng.integers(0, 2**16, (h, w)).astype(np.int32), "I").convert(mode)
    if mode == "PT":
        img = Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), "L").convert("P")
        img.info["transparency"] = int(rng.integers(0, 256))
        return img
    channels = {"1": 1, "L": 1, "LA": 2, "P": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (h, w, channels)).astype(np.uint8)
    if mode in ("1", "L", "P"):
        return Image.fromarray(pixels[..., 0], "L").convert(mode)
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(pixels[..., i], "L") for i in range(2)])
    return Image.fromarray(pixels, mode)


bombs = st.builds(lambda w, h, cut: bomb_png(w, h)[:cut], st.integers(2049, 100_000), st.integers(2049, 100_000),
                  st.sampled_from([None, 60, 33]))  # fmt: skip
inputs = st.one_of(st.binary(max_size=4096), image_files(), bombs)


def _bounded(call):
    """``call()``'s result, after checking its time and traced memory against the bounds."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return call()
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < SECONDS, f"{seconds:.1f} s"
        assert peak < PEAK_MIB * 2**20, f"{peak / 2**20:.0f} MiB"


@SETTINGS
@given(data=inputs)
def test_preprocessing_answers_a_model_input_or_one_line(data):
    def outcome():
        try:
            return to_mnist(decode_image(data, "upload"))
        except UserError as exc:
            return exc

    result = _bounded(outcome)
    if isinstance(result, UserError):
        assert str(result) and "\n" not in str(result)
    else:
        assert result.shape == (28, 28) and result.dtype == np.uint8 and result.max() > 0


@pytest.fixture(scope="module")
def client(demo_models):
    with TestClient(create_app([Predictor.load(demo_models["paths"][1])])) as c:
        yield c


@settings(SETTINGS, max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=inputs, as_json=st.booleans())
def test_api_answers_a_prediction_or_one_line_of_json(client, data, as_json):
    import base64

    if as_json:
        r = _bounded(lambda: client.post("/api/predict", json={"image": base64.b64encode(data).decode()}))
    else:
        r = _bounded(lambda: client.post("/api/predict", content=data, headers={"Content-Type": "image/png"}))
    doc = r.json()
    if r.status_code == 200:
        (pred,) = doc["predictions"]
        assert len(pred["probs"]) == 10 and abs(sum(pred["probs"]) - 1) < 1e-4
    else:
        assert r.status_code in (400, 413, 422) and list(doc) == ["error"]
        assert doc["error"] and "\n" not in doc["error"]
