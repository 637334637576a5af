"""``vitbn train`` (one training run, settings from flags and/or a YAML file) and ``vitbn eval`` (a saved model
on a test set)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from vitbn.cli.flags import MODEL_FLAGS, RUN_FLAGS, SHAPE_FLAGS, add_flags, dest, given, parse_device
from vitbn.config import PRECISIONS, RunConfig, load_yaml
from vitbn.errors import UserError

SECTIONS = ("model", "data", "train", "track", "hpo", "augment")
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
DEFAULT_MODEL = "vit"  # the preset a run without --model (and without model.name in --config) starts from

# The model knobs and the run settings, from the table ``vitbn experiment`` and ``vitbn bench`` share too.
FLAGS = {**MODEL_FLAGS, **SHAPE_FLAGS, **RUN_FLAGS}


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train one model (flags and/or --config FILE.yaml)")
    train.add_argument("--config", metavar="FILE", help="YAML with sections model/data/train/track/hpo/augment")
    shown = RunConfig.from_dict({"model": {"name": DEFAULT_MODEL}}).to_dict()
    add_flags(train.add_argument_group("model (see `vitbn models`)"), {**MODEL_FLAGS, **SHAPE_FLAGS}, shown)
    add_flags(train.add_argument_group("data, training, tracking"), RUN_FLAGS, shown)
    train.add_argument("--no-track", action="store_true", help="no MLflow (metrics stay in memory and the run folder)")
    train.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="per-epoch output: bar (on stderr), lines (on stdout) or none; auto: bar on a terminal, else lines",
    )
    train.set_defaults(func=run_train)

    ev = subparsers.add_parser("eval", help="evaluate a saved model (model.pt) on a test set")
    ev.add_argument("model", metavar="MODEL", help="a model.pt written by `vitbn train`, or a delta.pt (with --base)")
    ev.add_argument("--base", metavar="BASE", help="the model a delta.pt of `vitbn finetune` was fine-tuned from")
    ev.add_argument("--dataset", default="mnist", help="mnist, a registered dataset, npz:PATH or folder:PATH")
    ev.add_argument("--data-root", default=None, help="folder holding <dataset>/ ($VITBN_DATA when not given)")
    ev.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    ev.add_argument("--image-size", type=int, default=None, help="resize the images to NxN (as `vitbn finetune`)")
    ev.add_argument("--batch-size", type=int, default=5000, help="images per evaluation batch")
    ev.add_argument("--device", type=parse_device, default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                    help="auto: cuda, else mps, else cpu")  # fmt: skip
    ev.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16/fp16 autocast")
    ev.add_argument("--fuse-bn", action="store_true", help="fold BatchNorms into the linear layers first")
    ev.set_defaults(func=run_eval)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config file (if any) with the given flags written over it. ``--resume`` without ``--config`` starts from
    the run's own ``config.yaml``, so that only the flags given change it."""
    data = load_yaml(args.config) if args.config else {}
    if getattr(args, "resume", None) and not args.config:
        data = resumed_config(args)
    merged = dict(data)
    for name in SECTIONS:
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise UserError(f"config file {args.config}: section {name!r} must be a mapping")
        merged[name] = dict(section)
    merged["model"].setdefault("name", DEFAULT_MODEL)  # named by its preset, so that `vitbn serve` finds it
    for section, values in given(args, FLAGS).items():
        merged[section].update(values)
    if args.no_track:
        merged["track"]["enabled"] = False
    return RunConfig.from_dict(merged)


def resumed_config(args: argparse.Namespace) -> dict:
    """The ``config.yaml`` of the run that ``--run-name`` names under ``--out-dir`` ({} when the run folder has
    none).

    Raises:
        UserError: no ``--run-name``, or no such run folder (a misspelled name must not start a new run).
    """
    from pathlib import Path

    from vitbn.config import TrainConfig

    if not args.run_name:
        raise UserError("--resume needs --run-name NAME: the run to continue")
    root = Path(args.out_dir or TrainConfig.out_dir)
    folder = root / args.run_name
    if not folder.is_dir():
        runs = sorted(p.name for p in root.iterdir() if (p / "config.yaml").is_file()) if root.is_dir() else []
        there = f"runs there: {', '.join(runs[:10])}{' ...' if len(runs) > 10 else ''}" if runs else "it holds none"
        raise UserError(f"--resume: no run {args.run_name!r} under {root}/ ({there})")
    return load_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}


def resume_changes(args: argparse.Namespace, config: RunConfig) -> list[str]:
    """``key old -> new`` for each setting of the run's ``config.yaml`` that the flags given with ``--resume``
    change (``train.resume`` itself left out)."""
    from vitbn.config import flatten

    if not getattr(args, "resume", None) or args.config:
        return []
    old, new = flatten(resumed_config(args)), flatten(config.to_dict())
    return [f"{k} {old[k]} -> {new[k]}" for k in old if k in new and old[k] != new[k] and k != "train.resume"]


def resume_command(args: argparse.Namespace, run_name: str, command: list[str] | None = None) -> str:
    """The ``vitbn train`` command line (or ``command`` and the flags of the table given) that continues this
    run."""
    parts = list(command or ["vitbn", "train"])
    if args.config:
        parts += ["--config", args.config]
    for flag in FLAGS:
        value = getattr(args, dest(flag), None)
        if value is None or flag in ("--resume", "--run-name"):
            continue
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            parts += [flag, "x".join(str(v) for v in value)]  # --patch-size 4x4
        else:
            parts += [flag, str(value)]
    if args.no_track:
        parts.append("--no-track")
    return shlex.join([*parts, "--run-name", run_name, "--resume"])


def run_train(args: argparse.Namespace) -> int:
    """Trains one run; under ``torchrun`` this is one rank of a data-parallel run, and rank 0 reports."""
    from vitbn.engine import fit
    from vitbn.engine.distributed import destroy_distributed, is_main_process

    config = config_from_args(args)
    changes = resume_changes(args, config)
    if changes and os.environ.get("RANK", "0") == "0":  # one line per run, not per torchrun rank
        print(f"vitbn train: resuming {config.track.run_name} with changed settings: {', '.join(changes)}")
    result = None
    try:
        result = fit(config, progress=args.progress)
        main = is_main_process()
    finally:
        # every rank returns from fit with the same status: they meet before leaving (not after an error)
        destroy_distributed(barrier=result is not None and result.status != "killed")
    name, epochs = result.out_dir.name, len(result.history)
    if result.status == "diverged":
        if main:
            print(
                f"vitbn train: run {name} diverged in epoch {epochs} (non-finite training loss); try a lower --lr",
                file=sys.stderr,
            )
        return EXIT_DIVERGED
    if result.status == "killed":
        if main:
            print(
                f"vitbn train: interrupted after {epochs} complete epoch(s); resume with: {resume_command(args, name)}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if main:
        curves = log_curves(result, config)
        print(_summary(result, config) + (f"; curves {curves}" if curves else ""))
    return 0


def log_curves(result, config: RunConfig):
    """Writes the run's curves figure (``vitbn.report.compare.run_curves``) into its folder and logs it to the
    run's MLflow run; returns its path (None when the run has no epochs)."""
    from vitbn.report.compare import run_curves

    if not result.history:
        return None
    path = run_curves(result.out_dir)
    if config.track.enabled and result.run_id:
        from mlflow.tracking import MlflowClient

        from vitbn.tracking import resolve_tracking_uri

        MlflowClient(resolve_tracking_uri(config.track.tracking_uri)).log_artifact(result.run_id, str(path))
    return path


def _summary(result, config: RunConfig) -> str:
    final, history = result.final, result.history
    metrics = [f"{k} {100 * final[k]:.2f}%" for k in ("val/acc", "test/acc") if k in final]
    seconds = [r["time/train_epoch_s"] for r in history]
    per_epoch = f"{sum(seconds) / len(seconds):.1f} s/epoch train" if seconds else ""
    tracked = f"; MLflow run {result.run_id}" if config.track.enabled else ""
    return (
        f"run {result.out_dir.name} finished after {len(history)} epoch(s): {'  '.join(metrics)}  {per_epoch}; "
        f"model {result.out_dir / 'model.pt'}{tracked}"
    )


def run_eval(args: argparse.Namespace) -> int:
    from vitbn.config import DataConfig
    from vitbn.data import InMemoryLoader, prepare_data
    from vitbn.engine import evaluate, load_model, resolve_device
    from vitbn.engine.setup import check_data_fits_model
    from vitbn.models import count_params

    device = resolve_device(args.device)
    if args.base:
        from vitbn.engine.delta import load_delta

        model = load_delta(args.model, args.base, map_location=device)
    else:
        model = load_model(args.model, map_location=device)
    data = prepare_data(DataConfig(dataset=args.dataset, root=args.data_root, test_subset=args.test_subset))
    if args.image_size is not None:
        from vitbn.engine.adapt import resize_data

        data = resize_data(data, args.image_size, splits=("test",))
    check_data_fits_model(model.config, data.info)
    if args.fuse_bn:
        from vitbn.bn import fuse_bn
        from vitbn.bn.fuse import unfolded_norms

        model = fuse_bn(model)
        left = unfolded_norms(model)
        if left:
            print(left)
    loader = InMemoryLoader(data.test, batch_size=args.batch_size, mean=data.info.mean, std=data.info.std,
                            device=device)  # fmt: skip
    result = evaluate(model, loader, device=device, precision=args.precision)
    print(f"model     {args.model}  ({model.config.name}, {count_params(model):,} parameters)")
    print(f"data      {data.info.name} test set, {result['num_samples']} images, on {device} ({args.precision})")
    rate = result["num_samples"] / result["seconds"] if result["seconds"] else float("nan")
    print(f"accuracy  {100 * result['acc']:.2f}%   loss {result['loss']:.4f}")
    print(f"time      {result['seconds']:.3f} s  ({rate:.0f} images/s)")
    print(format_per_class(result, data.info.classes))
    print(format_confusion(result["confusion"], data.info.classes))
    return 0


def format_per_class(result: dict, classes: list[str]) -> str:
    counts = result["confusion"].sum(dim=1).tolist()
    lines = ["per-class accuracy"]
    for name, acc, n in zip(classes, result["per_class_acc"], counts):
        lines.append(f"  {name:>10}  {100 * acc:6.2f}%  of {n}")
    return "\n".join(lines)


def format_confusion(confusion, classes: list[str]) -> str:
    """The (K, K) matrix with class names; rows are true classes, columns predictions."""
    k = len(classes)
    width = max(5, max(len(str(int(v))) for v in confusion.flatten()) + 1, *(len(c) + 1 for c in classes[:k]))
    head = " " * 12 + "".join(f"{c[: width - 1]:>{width}}" for c in classes)
    rows = [f"  {name[:10]:>10}" + "".join(f"{int(v):>{width}}" for v in row) for name, row in zip(classes, confusion)]
    return "\n".join(["confusion matrix (rows: true class, columns: predicted)", head, *rows])
