"""``vitbn bn-study``: error vs normalization batch size with mini-batch, EMA and precise BN statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitbn.cli.args import add_set_argument


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 2,4,8")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bn-study",
        help="error vs normalization batch size: mini-batch vs population (EMA, precise) BatchNorm statistics",
        description="MODEL is a file written by export_model, or a preset name trained first with --train-epochs.",
    )
    p.add_argument("model", metavar="MODEL", help="model file (.pt from export_model) or preset name (vitbn, ...)")
    p.add_argument("--train-epochs", type=int, help="train the preset for this many epochs first (engine's fit)")
    add_set_argument(p, help="override a model field of the preset, e.g. --set depth=2 (repeatable)")
    p.add_argument("--batch-size", type=int, default=100, help="training batch size for --train-epochs")
    p.add_argument("--lr", type=float, default=None, help="learning rate for --train-epochs (default: the engine's)")
    p.add_argument("--dataset", default="mnist", help="dataset name, npz:PATH or folder:PATH")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $VITBN_DATA, else ~/.cache/vitbn)")
    p.add_argument("--train-subset", type=int, default=None, help="keep the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="keep the first N test images")
    p.add_argument(
        "--val-size",
        type=int,
        default=0,
        help="validation images carved from the training set; 0: validate on the test set",
    )
    p.add_argument("--nbs", type=_int_list, default=None, help="normalization batch sizes (default 2,4,...,1024)")
    p.add_argument("--eval-batch", type=int, default=1024, help="images per forward pass")
    p.add_argument("--precise-images", type=int, default=4096, help="training images for precise statistics")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=0, help="seeds the model and the batches")
    p.add_argument("--out-dir", default="reports/bn-study", help="where the table and the figure go")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, sqlite)")
    p.add_argument("--experiment", default="vitbn", help="MLflow experiment")
    p.add_argument("--run-name", default="bn-study", help="MLflow run name")
    p.set_defaults(func=run)


def _data_config(args: argparse.Namespace):
    from vitbn.config import DataConfig

    return DataConfig(
        dataset=args.dataset,
        root=args.data_root,
        val_size=args.val_size,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        split_seed=args.seed,
    )


def _model(args: argparse.Namespace, data):
    """The model to study: read from a file, or a preset trained for ``--train-epochs`` on ``data``."""
    from vitbn.config import ModelConfig
    from vitbn.errors import UserError

    path = Path(args.model)
    try:  # a preset or a name built on one: "vitbn", "vit+norm=prepbn"
        ModelConfig.from_preset(args.model)
        is_name = True
    except ValueError:
        is_name = False
    if not is_name or path.exists():
        if args.train_epochs is not None or args.overrides:
            raise UserError(f"--train-epochs and --set apply to a preset name, not to the model file {path}")
        from vitbn.engine.checkpoint import load_model

        return load_model(path)
    if args.train_epochs is None or args.train_epochs < 1:
        raise UserError(f"MODEL {args.model!r} is a preset: give --train-epochs N (N >= 1) to train it first")
    from vitbn.config import RunConfig, to_dict
    from vitbn.engine import fit

    train = {
        "epochs": args.train_epochs,
        "batch_size": args.batch_size,
        "device": args.device,
        "seed": args.seed,
        "out_dir": str(Path(args.out_dir) / "train"),
    }
    if args.lr is not None:
        train["lr"] = args.lr
    config = RunConfig.from_dict(
        {
            "model": {"name": args.model, **dict(args.overrides)},
            "data": to_dict(_data_config(args)),
            "train": train,
            "track": {"enabled": False},
        }
    )
    result = fit(config, data=data)
    if result.status != "finished":
        raise UserError(f"training {args.model!r} ended {result.status}; see {result.out_dir}")
    return result.model


def _check_shape(model, shape: tuple[int, int, int], dataset: str) -> None:
    from vitbn.config import pair
    from vitbn.errors import UserError

    c = model.config
    expected = (c.channels, *pair(c.image_size))
    if tuple(shape) != expected:
        raise UserError(f"the model takes {expected} (C, H, W) images but dataset {dataset!r} has {tuple(shape)}")


def run(args: argparse.Namespace) -> int:
    from vitbn.bn.study import bn_study, log_study, plot_study, write_tables
    from vitbn.data import prepare_data
    from vitbn.engine.device import resolve_device

    device = resolve_device(args.device)
    tracker = None
    if not args.no_track:  # before the work: an unreachable server fails fast
        from vitbn.config import TrackConfig
        from vitbn.tracking import make_tracker

        tracker = make_tracker(TrackConfig(tracking_uri=args.tracking_uri, experiment=args.experiment))
    data = prepare_data(_data_config(args))
    model = _model(args, data)
    _check_shape(model, data.shape, args.dataset)
    val, val_name = (data.val, "val") if data.val is not None else (data.test, "test")
    rows = bn_study(
        model,
        data.train,
        val,
        mean=data.mean,
        std=data.std,
        nbs=args.nbs,
        batch_size=args.eval_batch,
        precise_images=args.precise_images,
        device=device,
        seed=args.seed,
    )
    out = Path(args.out_dir)
    md, csv_path = write_tables(rows, out)
    figure = plot_study(rows, out / "bn_study.png", title=f"{model.config.name}: BN statistics ({val_name} split)")
    print(md.read_text(), end="")
    print(f"wrote {md}, {csv_path}, {figure}")
    if tracker is not None:
        from vitbn.config import flatten, to_dict

        params = {
            **flatten({"model": to_dict(model.config)}),
            "model_source": args.model,
            "dataset": args.dataset,
            "heldout_split": val_name,
            "nbs": ",".join(str(r["nbs"]) for r in rows),
            "train_images": len(data.train),
            "val_images": len(val),
            "precise_images": args.precise_images,
        }
        run_id = log_study(tracker, rows, [md, csv_path, figure], params, args.run_name)
        print(f"logged to MLflow run {run_id}")
    return 0
