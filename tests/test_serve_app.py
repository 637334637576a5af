"""The demo's JSON API in process (Starlette's TestClient) over real tiny trained models."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient
from torch.testing import assert_close

from vitbn.cli import main
from vitbn.engine import load_inference
from vitbn.serve import Predictor
from vitbn.serve.app import MAX_BODY, create_app


def off_centre_png(digit: np.ndarray) -> bytes:
    """An MNIST digit as a user would upload it: black on white, twice the size, off centre on a larger page."""
    page = np.full((120, 90), 255, np.uint8)
    big = np.asarray(Image.fromarray(digit).resize((56, 56), Image.Resampling.BILINEAR))
    page[8:64, 30:86] = 255 - big
    buf = io.BytesIO()
    Image.fromarray(page).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(demo_models):
    predictors = [Predictor.load(p) for p in demo_models["paths"]]
    with TestClient(create_app(predictors)) as c:
        yield c


def test_health_and_models(client, demo_models):
    assert client.get("/healthz").json() == {"status": "ok", "models": 2}
    models = client.get("/api/models").json()["models"]
    assert [m["name"] for m in models] == ["vit", "vitbn"]
    assert [m["bn_folded"] for m in models] == [False, True]
    vitbn, _ = load_inference(demo_models["paths"][1])
    folded = sum(p.numel() for p in Predictor.load(demo_models["paths"][1]).model.parameters())
    trained = sum(p.numel() for p in vitbn.parameters())
    assert (models[1]["params"], models[1]["params_served"]) == (trained, folded) and folded < trained  # BN folded
    assert models[1]["classes"] == [str(k) for k in range(10)] and models[1]["input"]["height"] == 28
    page = client.get("/")
    assert page.status_code == 200 and "canvas" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_predict_png_matches_the_unfolded_models(client, demo_models):
    digit, label = demo_models["images"][0], int(demo_models["labels"][0])
    r = client.post("/api/predict", content=off_centre_png(digit), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    for pred, path in zip(preds, demo_models["paths"]):
        model, spec = load_inference(path)  # as trained: BN not folded
        seen = np.array(pred["input"], np.uint8)
        x = (torch.from_numpy(seen).float()[None, None] / 255 - spec.mean[0]) / spec.std[0]
        with torch.no_grad():
            expected = model(x).softmax(-1)[0]
        assert_close(torch.tensor(pred["probs"]), expected, atol=1e-5, rtol=1e-4)
        assert sum(pred["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert pred["top"][0]["class"] == str(label)
        assert [t["prob"] for t in pred["top"]] == sorted(pred["probs"], reverse=True)[:3]
        attention = np.array(pred["attention"])
        # 16 float32 shares normalized to 1: their sum is 1 to about 16 float32 epsilons, not to float64's 1e-6
        assert attention.shape == (4, 4) and attention.sum() == pytest.approx(
            1.0, abs=16 * float(np.finfo(np.float32).eps)
        )
        assert pred["latency_ms"] > 0


def test_json_and_data_url_bodies_give_the_same_answer(client, demo_models):
    png = off_centre_png(demo_models["images"][1])
    raw = client.post("/api/predict", content=png, headers={"Content-Type": "image/png"}).json()
    b64 = base64.b64encode(png).decode()
    for image in (b64, "data:image/png;base64," + b64):
        doc = client.post("/api/predict", json={"image": image, "top_k": 5}).json()
        assert [p["probs"] for p in doc["predictions"]] == [p["probs"] for p in raw["predictions"]]
        assert len(doc["predictions"][0]["top"]) == 5


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"x" * (MAX_BODY + 1), {"Content-Type": "image/png"}, 413, "limit"),
        (b"not an image", {"Content-Type": "image/png"}, 400, "not an image"),
        (b"", {"Content-Type": "image/png"}, 400, "empty"),
        (b"{bad json", {"Content-Type": "application/json"}, 422, "not valid JSON"),
        (json.dumps({"picture": "x"}).encode(), {"Content-Type": "application/json"}, 422, '"image"'),
        (json.dumps({"image": "%%%"}).encode(), {"Content-Type": "application/json"}, 422, "base64"),
        (json.dumps({"image": "aGk=", "top_k": "many"}).encode(), {"Content-Type": "application/json"}, 422, "top_k"),
    ],
)
def test_bad_requests_get_one_line_and_the_server_stays_up(client, body, headers, status, message):
    r = client.post("/api/predict", content=body, headers=headers)
    assert r.status_code == status and message in r.json()["error"] and "\n" not in r.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_blank_and_corrupt_pngs(client, demo_models):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((280, 280), np.uint8)).save(buf, format="PNG")
    r = client.post("/api/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "blank" in r.json()["error"]
    cut = off_centre_png(demo_models["images"][0])[:300]
    r = client.post("/api/predict", content=cut, headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "corrupt" in r.json()["error"]
    r = client.post("/api/predict?top_k=0", content=off_centre_png(demo_models["images"][0]))
    assert r.status_code == 422 and "top_k=0" in r.json()["error"]


def test_concurrent_requests_give_the_sequential_answers(client, demo_models):
    pngs = [off_centre_png(d) for d in demo_models["images"][:6]]

    def ask(png):
        r = client.post("/api/predict", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 200
        return [p["probs"] for p in r.json()["predictions"]]

    sequential = [ask(p) for p in pngs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, pngs * 4))
    assert concurrent == sequential * 4


def test_serve_refuses_missing_corrupt_or_absent_models_in_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"corrupt")
    assert main(["serve", "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert (
        capsys.readouterr().err
        == f"vitbn serve: error: not a vitbn model file: {tmp_path / 'bad.pt'} (it holds no PyTorch weights)\n"
    )
    assert main(["serve", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no trained vit/vitbnffn/vitbn model" in err and "make run" in err and err.count("\n") == 1
