"""The demo's input limits: images refused from their header above MAX_PIXELS (predict and /api/predict), in
bounded memory; transparent canvases read as ink on a ground; every error answer of the server is JSON."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from imagebytes import bomb_png
from vitbn.cli import main
from vitbn.serve import Predictor
from vitbn.serve.app import create_app
from vitbn.serve.preprocess import MAX_PIXELS, ImageTooLargeError, decode_image, to_mnist

BOMB_SIDE = 10000  # 10^8 pixels: 100 MB as 8-bit gray, 2.4 GB as the float64 RGB array decoding made of it


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png(BOMB_SIDE, BOMB_SIDE)


@pytest.fixture(scope="module")
def client(demo_models):
    with TestClient(create_app([Predictor.load(demo_models["paths"][0])])) as c:
        yield c


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns; the file is what we want
def test_bomb_png_is_small_and_declares_its_size(bomb):
    assert len(bomb) < 200_000
    with Image.open(io.BytesIO(bomb)) as img:
        assert img.size == (BOMB_SIDE, BOMB_SIDE)
    small = bomb_png(9, 3)
    with Image.open(io.BytesIO(small)) as img:
        assert np.asarray(img.convert("L")).tolist() == [[0] * 9] * 3  # a valid file: it decodes


def test_decode_refuses_a_bomb_from_its_header_in_bounded_memory(bomb, tmp_path):
    """In a fresh process (numpy + Pillow only), so that its peak resident memory says what decoding took."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    code = (
        "import resource, sys\n"
        "from vitbn.serve.preprocess import decode_image, ImageError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    decode_image(data, 'bomb.png'); print('decoded')\n"
        "except ImageError as exc:\n    print(exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"  # KiB -> MiB on Linux
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    message, grown_mib = out.stdout.strip().splitlines()
    assert message == f"bomb.png is {BOMB_SIDE}x{BOMB_SIDE} pixels; the limit is {MAX_PIXELS:,} pixels (e.g. 2048x2048)"
    assert int(grown_mib) < 20, out.stdout


def test_limit_is_inclusive():
    side = int(MAX_PIXELS**0.5)
    assert side * side == MAX_PIXELS
    assert decode_image(bomb_png(side, side)).shape == (side, side)  # at the limit: decoded
    with pytest.raises(ImageTooLargeError, match=f"is {side + 1}x{side} pixels"):
        decode_image(bomb_png(side + 1, side))


def test_api_answers_413_to_a_bomb(client, bomb):
    r = client.post("/api/predict", content=bomb, headers={"Content-Type": "image/png"})
    assert r.status_code == 413
    assert r.json() == {
        "error": f"the uploaded image is {BOMB_SIDE}x{BOMB_SIDE} pixels; the limit is {MAX_PIXELS:,} pixels (e.g. "
        "2048x2048)"
    }


def test_predict_names_the_bomb_in_one_line(demo_models, bomb, tmp_path, capsys):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    assert main(["predict", str(demo_models["paths"][0]), str(path), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert rows == [{"file": str(path), "error": f"{path} is {BOMB_SIDE}x{BOMB_SIDE} pixels; the limit is "
                     f"{MAX_PIXELS:,} pixels (e.g. 2048x2048)"}]  # fmt: skip


def _rgba_png(gray: np.ndarray, alpha: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.stack([gray, gray, gray, alpha], axis=-1).astype(np.uint8), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("ink_level", [0, 255])
def test_ink_on_a_transparent_canvas_is_read_like_ink_on_paper(ink_level):
    """Black ink on a transparent canvas (a drawing app's export) is the same digit as black ink on white paper;
    white ink on a transparent canvas, the same as white ink on black."""
    stroke = np.zeros((40, 40), bool)
    stroke[5:35, 18:22] = True
    stroke[5:9, 10:22] = True
    alpha = np.where(stroke, 255, 0)
    gray = np.full((40, 40), ink_level)  # the colour of transparent pixels does not matter: give them the ink's
    on_paper = np.where(stroke, ink_level, 255 - ink_level).astype(np.uint8)
    np.testing.assert_array_equal(to_mnist(decode_image(_rgba_png(gray, alpha))), to_mnist(on_paper))


def test_api_reads_a_transparent_canvas(client, demo_models):
    digit, label = demo_models["images"][0], int(demo_models["labels"][0])
    alpha = digit  # MNIST's ink as opacity, drawn in black
    r = client.post(
        "/api/predict", content=_rgba_png(np.zeros_like(digit), alpha), headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top"][0]["index"] == label


def test_every_error_answer_is_json(client):
    r = client.get("/no/such/page")
    assert (r.status_code, r.json()) == (404, {"error": "no such path: /no/such/page"})
    r = client.get("/api/predict")
    assert (r.status_code, r.json()) == (405, {"error": "GET is not allowed on /api/predict"})
    assert "POST" in r.headers["allow"]
    assert client.get("/static/missing.js").json() == {"error": "no such path: /static/missing.js"}


def test_api_and_eval_count_the_same_parameters(demo_models, capsys):
    """One model, one count: /api/models says what `vitbn eval` says (it used to give the BN-folded model's)."""
    path = demo_models["paths"][1]  # the vitbn model: folding changes its parameters
    assert main(["eval", str(path), "--test-subset", "10"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    with TestClient(create_app([Predictor.load(path)])) as c:
        (model,) = c.get("/api/models").json()["models"]
    assert model["name"] == "vitbn" and model["params_served"] != model["params"]
    assert f"(vitbn, {model['params']:,} parameters)" in first


def test_serve_on_a_busy_port_is_one_line_and_prints_no_url(demo_models, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(demo_models["paths"][0]), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "http://" not in out
    assert err == (
        f"vitbn serve: error: port {port} on 127.0.0.1 is in use: stop what listens there, or pass another --port "
        "(0: any free port)\n"
    )


def test_serve_port_0_prints_the_port_it_listens_on(demo_models):
    import urllib.request

    cmd = [sys.executable, "-m", "vitbn", "serve", "--checkpoint", str(demo_models["paths"][0]), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("vitbn serve:"):  # the model's line, then the URL
            lines.append(proc.stdout.readline())
        assert lines[0].startswith("model vit") and len(lines) == 2, lines
        url = lines[-1].split()[2]
        assert lines[-1] == f"vitbn serve: {url}  (Ctrl-C stops)\n" and not url.endswith(":0/"), lines
        with urllib.request.urlopen(url + "healthz", timeout=30) as answer:  # at once: it listens already
            assert json.loads(answer.read()) == {"status": "ok", "models": 1}
    finally:
        proc.terminate()
        proc.wait(30)
