"""The one table of model and training flags that ``vitbn train``, ``vitbn experiment`` and ``vitbn bench`` share.

A flag maps to a config field: ``--parallel 2`` -> ``model.parallel = 2``. Every default is None, so only the
flags given override the config file, the preset or the dataclass defaults. A bad value gets one line that names
the flag and the allowed values (``argparse`` choices and types, then ``flag_error`` for the configs' own checks).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from vitbn.config import (
    ATTN_IMPLS,
    AUGMENT_LEVELS,
    BN_STATS,
    NORMS,
    OPTIMIZERS,
    POOLS,
    POS_EMBS,
    PRECISIONS,
    SCHEDULES,
    STEMS,
    check_device,
)


@dataclass(frozen=True)
class Flag:
    """A command-line flag for one config field."""

    section: str  # "model" | "data" | "train" | "track" | "augment"
    field: str
    kwargs: dict


def dest(flag: str) -> str:
    """The attribute argparse stores ``flag`` under: ``--drop-path`` -> ``drop_path``."""
    return flag.lstrip("-").replace("-", "_")


def _patch(text: str) -> int | list[int]:
    """``7`` or ``7x14`` (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or HxW, e.g. 7 or 4x4") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer or HxW, e.g. 7 or 4x4")


def _optional_float(text: str) -> float | None:
    """A float, or ``none`` / ``off`` for a knob that can be switched off."""
    if text.lower() in ("none", "off", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def parse_device(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps."""
    try:
        return check_device(text, "--device")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _norm(help: str) -> dict:
    return dict(choices=NORMS, help=help)


_BOOL = argparse.BooleanOptionalAction

MODEL_FLAGS: dict[str, Flag] = {
    "--model": Flag(
        "model",
        "name",
        dict(
            help="model preset: vit, vitbnffn, vitbn (see `vitbn models`); the other model flags override its settings"
        ),
    ),
    "--depth": Flag("model", "depth", dict(type=int, help="stages (blocks, or groups of --parallel blocks)")),
    "--dim": Flag("model", "dim", dict(type=int, help="token width D")),
    "--heads": Flag("model", "heads", dict(type=int, help="attention heads per block")),
    "--dim-head": Flag("model", "dim_head", dict(type=int, help="width of one head")),
    "--mlp-dim": Flag("model", "mlp_dim", dict(type=int, help="hidden width of the feed-forward block")),
    "--patch-size": Flag("model", "patch_size", dict(type=_patch, help="patch side, or HxW")),
    "--pool": Flag("model", "pool", dict(choices=POOLS, help="classify the CLS token or the mean token")),
    "--class-token": Flag("model", "class_token", dict(action=_BOOL, help="a CLS token (default: iff pool=cls)")),
    "--pos-emb": Flag("model", "pos_emb", dict(choices=POS_EMBS, help="learned or fixed sincos positions")),
    "--dropout": Flag("model", "dropout", dict(type=float, help="dropout in attention and feed-forward blocks")),
    "--emb-dropout": Flag("model", "emb_dropout", dict(type=float, help="dropout on the embedded tokens")),
    "--norm": Flag("model", "norm", _norm("every norm of the preset (slots that hold one); per-slot flags win")),
    "--embed-norm": Flag("model", "embed_norm", _norm("norms of the patch embedding / stem")),
    "--attn-norm": Flag("model", "attn_norm", _norm("pre-norm of attention")),
    "--ffn-norm": Flag("model", "ffn_norm", _norm("pre-norm of the feed-forward block")),
    "--ffn-inner-norm": Flag("model", "ffn_inner_norm", _norm("norm between fc1 and GELU")),
    "--final-norm": Flag("model", "final_norm", _norm("norm after the last block")),
    "--bn-stats": Flag("model", "bn_stats", dict(choices=BN_STATS, help="per-feature or scalar BN statistics")),
    "--bn-momentum": Flag("model", "bn_momentum", dict(type=float, help="BatchNorm running-average momentum")),
    "--ghost-batch-size": Flag("model", "ghost_batch_size", dict(type=int, help="ghost BN sub-batch size")),
    "--dyt-alpha": Flag("model", "dyt_alpha", dict(type=float, help="DyT's initial alpha (default 0.5)")),
    "--attn-impl": Flag(
        "model", "attn_impl", dict(choices=ATTN_IMPLS, help="attention: fused, plain, auto (measured)")
    ),
    "--parallel": Flag("model", "parallel", dict(type=int, help="parallel blocks per stage (Touvron et al. 2022)")),
    "--layer-scale": Flag("model", "layer_scale", dict(type=_optional_float, help="LayerScale init, or none")),
    "--drop-path": Flag("model", "drop_path", dict(type=float, help="stochastic depth rate of the last stage")),
    "--stem": Flag("model", "stem", dict(choices=STEMS, help="linear patch embedding, hMLP or conv stem")),
}

# The input a model is built for (``vitbn train`` only: the experiments are defined on MNIST).
SHAPE_FLAGS: dict[str, Flag] = {
    "--image-size": Flag("model", "image_size", dict(type=_patch, help="image side the model takes, or HxW (e.g. 8 "
                                                     "for --dataset digits, with --patch-size 4 or 2)")),
    "--channels": Flag("model", "channels", dict(type=int, help="image channels the model takes (3 for RGB)")),
    "--num-classes": Flag("model", "num_classes", dict(type=int, help="outputs of the classifier head")),
}  # fmt: skip

RUN_FLAGS: dict[str, Flag] = {
    "--dataset": Flag("data", "dataset", dict(help="mnist, a registered dataset, npz:PATH or folder:PATH")),
    "--data-root": Flag("data", "root", dict(help="folder holding <dataset>/ (default $VITBN_DATA)")),
    "--val-size": Flag("data", "val_size", dict(type=int, help="training images held out for validation")),
    "--val-fraction": Flag("data", "val_fraction", dict(type=float, help="fraction of each class held out for "
                           "validation (stratified, seeded by the split seed), in (0, 0.5]")),
    "--train-subset": Flag("data", "train_subset", dict(type=int, help="use the first N training images")),
    "--test-subset": Flag("data", "test_subset", dict(type=int, help="use the first N test images")),
    "--epochs": Flag("train", "epochs", dict(type=int, help="passes over the training set")),
    "--lr": Flag("train", "lr", dict(type=float, help="learning rate")),
    "--batch-size": Flag("train", "batch_size", dict(type=int, help="training images per step")),
    "--eval-batch-size": Flag("train", "eval_batch_size", dict(type=int, help="images per evaluation "
                               "batch")),
    "--optimizer": Flag("train", "optimizer", dict(choices=OPTIMIZERS, help="the optimizer")),
    "--weight-decay": Flag("train", "weight_decay", dict(type=float, help="decoupled (adamw) or L2 "
                            "weight decay")),
    "--schedule": Flag("train", "schedule", dict(choices=SCHEDULES, help="constant (the study's) or cosine")),
    "--warmup-epochs": Flag("train", "warmup_epochs", dict(type=float, help="linear warm-up length")),
    "--label-smoothing": Flag("train", "label_smoothing", dict(type=float, help="label smoothing "
                               "of the cross-entropy, in [0, 1)")),
    "--grad-clip": Flag("train", "grad_clip", dict(type=float, help="max global gradient norm")),
    "--device": Flag("train", "device", dict(type=parse_device, metavar="{auto,cpu,cuda,cuda:N,mps}",
                                             help="auto: cuda, else mps, else cpu")),
    "--precision": Flag("train", "precision", dict(choices=PRECISIONS, help="fp32, or bf16/fp16 autocast")),
    "--compile": Flag("train", "compile", dict(action=_BOOL, help="torch.compile the model")),
    "--tf32": Flag("train", "tf32", dict(action=_BOOL, help="TF32 for fp32 matmuls and cuDNN convolutions alike "
                   "on Ampere+ GPUs (default: off, fp32 stays fp32)")),
    "--threads": Flag("train", "threads", dict(type=int, help="torch.set_num_threads")),
    "--seed": Flag("train", "seed", dict(type=int, help="seeds the initialization and the batch "
                    "order")),
    "--max-steps": Flag("train", "max_steps_per_epoch", dict(type=int, help="cap on batches per epoch")),
    "--precise-bn": Flag("train", "precise_bn", dict(action=_BOOL, help="recompute BN statistics before evaluating")),
    "--sync-bn": Flag("train", "sync_bn", dict(action=_BOOL, help="torchrun: BatchNorm statistics over all ranks")),
    "--prepbn-warmup-steps": Flag("train", "prepbn_warmup_steps", dict(type=int, help="PRepBN: LayerNorm-only "
                                  "steps (default: a tenth of the run)")),
    "--prepbn-decay-steps": Flag("train", "prepbn_decay_steps", dict(type=int, help="PRepBN: steps of the fall "
                                 "from LayerNorm to RepBN (default: to the end of the run)")),
    "--sam-rho": Flag("train", "sam_rho", dict(type=_optional_float, help="SAM: radius rho of the sharpness-aware "
                      "perturbation (e.g. 0.05; each step runs two forward/backward passes)")),
    "--asam": Flag("train", "sam_adaptive", dict(action=_BOOL, help="ASAM: perturbation scaled by |w| (with "
                   "--sam-rho)")),
    "--early-stopping": Flag("train", "early_stopping", dict(type=int, metavar="PATIENCE", help="stop after "
                             "PATIENCE epochs without a better val accuracy (best.pt keeps the best epoch)")),
    "--augment": Flag("augment", "level", dict(choices=AUGMENT_LEVELS, help="AugReg level: none (the study's), "
                      "light, medium, heavy (digits), natural-light/-medium/-heavy (crop 4 + flip); the flags below "
                      "override its settings")),
    "--crop-padding": Flag("augment", "crop_padding", dict(type=int, help="random translation up to N pixels")),
    "--hflip": Flag("augment", "hflip", dict(action=_BOOL, help="random horizontal flip (natural images; refused "
                    "on digits and characters)")),
    "--rotate": Flag("augment", "rotate", dict(type=float, help="random rotation up to this many degrees")),
    "--randaug-ops": Flag("augment", "randaug_ops", dict(type=int, help="RandAugment: ops per image (0: off)")),
    "--randaug-magnitude": Flag("augment", "randaug_magnitude", dict(type=int, help="RandAugment magnitude, "
                                "0..30")),
    "--mixup": Flag("augment", "mixup_alpha", dict(type=float, help="Mixup alpha (0: off)")),
    "--cutmix": Flag("augment", "cutmix_alpha", dict(type=float, help="CutMix alpha (0: off)")),
    "--mix-prob": Flag("augment", "mix_prob", dict(type=float, help="probability that a batch is mixed")),
    "--out-dir": Flag("train", "out_dir", dict(help="checkpoints and models go to OUT_DIR/RUN_NAME (default runs)")),
    "--resume": Flag("train", "resume", dict(action="store_true", default=None, help="continue RUN_NAME's run")),
    "--tracking-uri": Flag("track", "tracking_uri", dict(help="MLflow URI (default: $MLFLOW_TRACKING_URI, sqlite)")),
    "--experiment": Flag("track", "experiment", dict(help="MLflow experiment name")),
    "--run-name": Flag("track", "run_name", dict(help="run name (default <model>-<time>)")),
}  # fmt: skip


def pick(table: dict[str, Flag], *names: str, drop: tuple[str, ...] = ()) -> dict[str, Flag]:
    """A sub-table: the flags ``names`` (all when none are named) minus ``drop``, in the table's order."""
    return {f: flag for f, flag in table.items() if (not names or f in names) and f not in drop}


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, table: dict[str, Flag], shown: dict | None = None
) -> None:
    """Adds every flag of ``table`` with default None (a flag not given leaves the config file's value).

    Args:
        parser: the parser or group to add to.
        table: the flags.
        shown: the config the flags override, as ``RunConfig.to_dict()``: its values are written in the help as
            the defaults (None: not shown, where a preset decides them).
    """
    for flag, spec in table.items():
        kwargs = {"default": None, **spec.kwargs}
        value = (shown or {}).get(spec.section, {}).get(spec.field)
        if shown is not None and value is not None and value is not False and "default" not in kwargs["help"]:
            kwargs["help"] = f"{kwargs['help']} (default: {value})".replace("%", "%%")
        parser.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, table: dict[str, Flag]) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` for the flags of ``table`` that were given."""
    out: dict[str, dict[str, Any]] = {}
    for flag, spec in table.items():
        value = getattr(args, dest(flag), None)
        if value is not None:
            out.setdefault(spec.section, {})[spec.field] = value
    return out


def flag_error(message: str, args: argparse.Namespace, tables: tuple[dict[str, Flag], ...]) -> str:
    """A config error about a field (``"parallel=0 must be ..."``) named by the flag that set it
    (``"--parallel: parallel=0 must be ..."``); other messages unchanged."""
    for table in tables:
        for flag, spec in table.items():
            if getattr(args, dest(flag), None) is not None and message.startswith((f"{spec.field}=", f"{dest(flag)}=")):
                return f"{flag}: {message}"
    return message
