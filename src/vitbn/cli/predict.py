"""``vitbn predict``: class probabilities of image files from a trained model, with the demo's preprocessing."""

from __future__ import annotations

import argparse
import json

from vitbn.serve.predictor import PREPROCESS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="name the digits in image files (PNG/JPEG/npz or a folder) with a trained model",
        description="Images go through the demo's MNIST preprocessing (grayscale, bright ink on dark, crop, "
        "20x20 box, centered by center of mass in 28x28) unless --preprocess says otherwise.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt written by `vitbn train`, or its run folder")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="PNG/JPEG/... files, .npz files or folders")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS,
        default="auto",
        help="auto: mnist for grayscale models, else resize; none: images already in the model's size",
    )
    p.add_argument("--no-fuse-bn", action="store_true", help="run the model as trained, BatchNorm not folded")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitbn.errors import UserError
    from vitbn.serve.predictor import Predictor
    from vitbn.serve.preprocess import list_images, load_images

    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k} must be >= 1")
    predictor = Predictor.load(args.checkpoint, fuse=not args.no_fuse_bn)
    rows = []
    for path in list_images(args.images):  # a bad file names itself, and the others still get an answer
        try:
            named = load_images(path)
        except UserError as exc:
            rows.append({"file": str(path), "error": str(exc)})
            continue
        rows += [_answer(predictor, name, image, args) for name, image in named]
    if args.json:
        print(json.dumps({"model": predictor.source, "name": predictor.name, "predictions": rows}, indent=2))
    else:
        print(f"model {predictor.source} ({predictor.name}{', BN folded' if predictor.folded else ''})")
        width = max(len(r["file"]) for r in rows)
        for r in rows:
            answer = r.get("error") or "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
            print(f"{r['file']:<{width}}  {answer}")
    return 1 if any("error" in r for r in rows) else 0


def _answer(predictor, name: str, image, args: argparse.Namespace) -> dict:
    from vitbn.errors import UserError

    try:
        pred = predictor.predict([predictor.prepare(image, args.preprocess)], top_k=args.top_k)[0]
    except UserError as exc:  # blank, or not of the model's size
        return {"file": name, "error": str(exc)}
    return {"file": name, "top": [{"class": c, "index": i, "prob": p} for i, c, p in pred.top]}
