"""``vitbn predict`` on image files, npz files and folders, and the model file's input spec."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from PIL import Image

from test_serve_app import off_centre_png
from vitbn.cli import main
from vitbn.engine import InputSpec, load_inference


def test_predict_names_off_centre_mnist_pngs(demo_models, tmp_path, capsys):
    images, labels = demo_models["images"][:4], demo_models["labels"][:4]
    for i, digit in enumerate(images):
        (tmp_path / f"d{i}.png").write_bytes(off_centre_png(digit))
    np.savez(tmp_path / "raw.npz", images=images)  # MNIST's own form: white ink on black, centered
    assert main(["predict", str(demo_models["paths"][0]), str(tmp_path), "--json", "--top-k", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "vit"
    rows = doc["predictions"]
    assert [r["file"].split("/")[-1] for r in rows] == [
        *(f"d{i}.png" for i in range(4)),
        *(f"raw.npz:images[{i}]" for i in range(4)),
    ]
    assert [int(r["top"][0]["class"]) for r in rows] == [*labels, *labels]
    assert all(len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"] for r in rows)


def test_predict_text_output_and_errors(demo_models, tmp_path, capsys):
    good = tmp_path / "seven.png"
    good.write_bytes(off_centre_png(demo_models["images"][0]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", str(demo_models["paths"][1]), str(good), str(bad)]) == 1  # one bad file: exit 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model ") and "vitbn, BN folded" in out[0]
    assert out[1].split()[:2] == [str(good), str(demo_models["labels"][0])]
    assert "not an image in a format" in out[2]
    assert main(["predict", str(demo_models["paths"][1]), str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(demo_models["paths"][1]), str(good), "--top-k", "0"]) == 2
    assert "--top-k 0 must be >= 1" in capsys.readouterr().err
    raw = tmp_path / "raw.png"
    Image.fromarray(np.zeros((20, 20), np.uint8) + 255).save(raw)
    assert main(["predict", str(demo_models["paths"][1]), str(raw), "--preprocess", "none"]) == 1
    assert "the model takes (28, 28)" in capsys.readouterr().out


def test_model_file_records_its_input_and_old_files_read_config_yaml(demo_models, tmp_path):
    model, spec = load_inference(demo_models["paths"][0])
    assert spec.dataset == "mnist" and spec.classes == tuple(str(k) for k in range(10))
    assert abs(spec.mean[0] - 0.1307) < 1e-3 and abs(spec.std[0] - 0.3081) < 1e-3  # MNIST's statistics
    # a file from before the spec was recorded: its run folder's config.yaml names the dataset
    run = tmp_path / "old-run"
    shutil.copytree(demo_models["paths"][0].parent, run)
    saved = torch.load(run / "model.pt", weights_only=True)
    del saved["data"]
    torch.save(saved, run / "model.pt")
    _, old_spec = load_inference(run)  # a run folder works too
    assert old_spec == spec
    assert InputSpec.from_dict(spec.to_dict()) == spec
