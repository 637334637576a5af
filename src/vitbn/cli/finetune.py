"""``vitbn finetune``: a trained model fine-tuned on another dataset, all of it or one part (attention only,
feed-forward only, head only, norms only), with the run flags of ``vitbn train``."""

from __future__ import annotations

import argparse
import sys

from vitbn.cli.flags import RUN_FLAGS, add_flags, pick
from vitbn.config import RunConfig, load_yaml
from vitbn.errors import UserError

# The run flags of ``vitbn train``; --dataset (required here) and --precise-bn (its meaning widened) are added apart.
FLAGS = pick(RUN_FLAGS, drop=("--dataset", "--precise-bn"))


def register(subparsers) -> None:
    from vitbn.engine.finetune import PARTS

    ft = subparsers.add_parser("finetune", help="fine-tune a trained model on another dataset (all of it or a part)")
    ft.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt written by `vitbn train`, or its run folder")
    ft.add_argument("--dataset", required=True, help="the new data: a registered name, digits, npz:PATH, folder:PATH")
    ft.add_argument("--train", dest="part", choices=PARTS, default="all",
                    help="what trains besides the head: all (default), attn (attention projections, Touvron et "
                         "al. 2022), ffn, head (a linear probe) or norm (the norms' affine parameters)")  # fmt: skip
    ft.add_argument("--image-size", type=int, metavar="N",
                    help="resize the images to NxN once before training (bilinear, antialiased); the position "
                         "table is resampled when the patch grid changes")  # fmt: skip
    ft.add_argument("--precise-bn", action=argparse.BooleanOptionalAction, default=None,
                    help="BN models: the statistics are re-estimated on the new data before the first epoch "
                         "(default); --precise-bn also before every evaluation, --no-precise-bn never")  # fmt: skip
    ft.add_argument("--config", metavar="FILE", help="YAML: sections data/train/track/augment (the model: CHECKPOINT)")
    add_flags(ft.add_argument_group("data, training, tracking (as `vitbn train`)"), FLAGS)
    ft.add_argument("--no-track", action="store_true", help="no MLflow (metrics stay in memory and the run folder)")
    ft.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="per-epoch output: bar (on stderr), lines (on stdout) or none; auto: bar on a terminal, else lines",
    )
    ft.set_defaults(func=run_finetune)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """As ``vitbn train``'s: the config file (without a model section: the model is the checkpoint's) with the
    given flags written over it."""
    from vitbn.cli.train import config_from_args as train_config

    if args.config and (load_yaml(args.config).get("model") or None) is not None:
        raise UserError(f"config file {args.config}: drop its model section; vitbn finetune takes the checkpoint's")
    return train_config(args)


def run_finetune(args: argparse.Namespace) -> int:
    from vitbn.cli.train import EXIT_DIVERGED, EXIT_INTERRUPTED, resume_command
    from vitbn.engine.finetune import finetune

    config = config_from_args(args)
    result = finetune(args.checkpoint, config, part=args.part, image_size=args.image_size,
                      precise_bn=args.precise_bn is not False, progress=args.progress)  # fmt: skip
    name, epochs = result.out_dir.name, len(result.history)
    if result.status == "diverged":
        print(f"vitbn finetune: run {name} diverged in epoch {epochs} (non-finite training loss); try a lower --lr",
              file=sys.stderr)  # fmt: skip
        return EXIT_DIVERGED
    if result.status == "killed":
        command = ["vitbn", "finetune", args.checkpoint, "--train", args.part]
        command += ["--image-size", str(args.image_size)] if args.image_size else []
        print(f"vitbn finetune: interrupted after {epochs} complete epoch(s); resume with: "
              f"{resume_command(args, name, command)}", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    print(summary(result, config))
    return 0


def summary(result, config: RunConfig) -> str:
    """Three lines: what was adapted, the cost of a training step, and the run's result with its files."""
    f, params = result.final, result.params
    trainable, total = int(f["finetune/trainable_params"]), int(f["finetune/total_params"])
    memory = f.get("finetune/peak_step_memory_mb")
    memory = f"{memory:.3g} MiB ({params['finetune.memory_method']})" if memory is not None else "n/a"
    metrics = "  ".join(f"{k} {100 * f[k]:.2f}%" for k in ("val/acc", "test/acc") if k in f)
    tracked = f"; MLflow run {result.run_id}" if config.track.enabled else ""
    return "\n".join([
        f"adapted   {'; '.join(result.notes) or 'nothing to adapt'}",
        f"finetune  {result.part}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.1f}%); "
        f"peak step memory {memory}; step {f['finetune/step_time_ms']:.3g} ms",
        f"run {result.out_dir.name} finished after {len(result.history)} epoch(s): {metrics}; delta "
        f"{f['finetune/delta_mb']:.3g} MiB of {f['finetune/full_mb']:.3g} MiB full: {result.delta_path}; model "
        f"{result.out_dir / 'model.pt'}{tracked}",
    ])  # fmt: skip
