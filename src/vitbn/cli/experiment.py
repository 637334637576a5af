"""``vitbn experiment lr-sweep`` (experiment 1) and ``vitbn experiment tune`` (experiment 2, Ax)."""

from __future__ import annotations

import argparse
import logging
import sys

from vitbn.cli.flags import MODEL_FLAGS, Flag, add_flags, given, pick
from vitbn.cli.flags import RUN_FLAGS as TABLE_RUN_FLAGS

# Shared settings written over the preset's ``run``: the run flags that make sense for a whole experiment, and
# every model knob but the preset's own (model, depth), for all its models (a model entry's overrides win).
RUN_FLAGS = {
    **pick(TABLE_RUN_FLAGS, "--train-subset", "--test-subset", "--val-size", "--data-root", "--max-steps", "--device",
           "--threads", "--precision", "--sam-rho", "--asam", "--out-dir", "--tracking-uri", "--experiment"),
    **pick(MODEL_FLAGS, drop=("--model", "--depth")),
}  # fmt: skip
TUNE_FLAGS: dict[str, Flag] = {
    "--trials": Flag("hpo", "trials", dict(type=int, help="total trials per model (a larger number continues)")),
    "--sobol-trials": Flag("hpo", "sobol_trials", dict(type=int, help="quasi-random trials before BoTorch")),
    "--trial-epochs": Flag("hpo", "epochs", dict(type=int, help="epochs per trial")),
    "--lr-min": Flag("hpo", "lr_min", dict(type=float, help="lower lr bound (default: the study's per model)")),
    "--lr-max": Flag("hpo", "lr_max", dict(type=float, help="upper lr bound")),
}


def _split(values: list[str] | None) -> list[str] | None:
    """``["vit,vitbn", "vitbnffn"]`` -> ``["vit", "vitbn", "vitbnffn"]``."""
    return [v for value in values for v in value.split(",") if v] if values else None


def _common(parser: argparse.ArgumentParser, flags: dict) -> None:
    parser.add_argument("--preset", default=None, help="a preset name or a YAML file (see --list)")
    parser.add_argument("--config", default=None, metavar="FILE", help="same as --preset FILE.yaml")
    parser.add_argument("--models", nargs="+", help="keep these models: names (every depth) or labels (vitbn-d1)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (values, e.g. --seeds 0 1 2)")
    add_flags(parser, flags)
    parser.add_argument("--report-dir", default=None, help="afterwards, build the report into this folder")
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="per-epoch output: bar (on stderr), lines (on stdout) or none; auto: bar on a terminal, else lines",
    )
    parser.add_argument("--list", action="store_true", help="list the presets and exit")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run an experiment: lr-sweep (study 1), tune (study 2), recipes, norms, sam, augreg, transfer or best",
    )
    sub = parser.add_subparsers(dest="experiment_command", metavar="EXPERIMENT", required=True)
    sweep = sub.add_parser("lr-sweep", help="models x learning rates x seeds, nested MLflow runs (resumable); "
                           "default preset quick (minutes), --preset study for the study's 30 epochs")  # fmt: skip
    _common(sweep, RUN_FLAGS)
    sweep.add_argument("--lr", nargs="+", type=float, help="a subset of the preset's learning rates")
    sweep.add_argument("--epochs", type=int, help="epochs of every training run")
    sweep.set_defaults(func=resumable(run_sweep), default_preset="quick")  # minutes; --preset study is hours on a CPU
    recipes = sub.add_parser("recipes", help="Touvron et al.'s recipes (parallel blocks, LayerScale, stochastic "
                             "depth, hMLP stem) on ViT and ViTBN, with a report")  # fmt: skip
    norms = sub.add_parser("norms", help="LayerNorm, RMSNorm, DyT, BatchNorm (FFN / everywhere) and PRepBN on one "
                           "depth-6 ViT, 3 lrs, 2 seeds, selected on validation, with a report")  # fmt: skip
    sam = sub.add_parser("sam", help="ViT and ViTBN (depth 6) with Adam and Adam + SAM (rho 0.05), then vitbn "
                         "analyze of each (lambda_max, active neurons, attention), with a report")  # fmt: skip
    augreg = sub.add_parser("augreg", help="augmentation x regularization on MNIST subsets (Steiner et al. 2021), "
                            "ViT and ViTBN, the epoch selected on validation, with a report and heatmap")  # fmt: skip
    transfer = sub.add_parser("transfer", help="pre-train on MNIST, then digits from scratch (+ AugReg) and "
                              "fine-tuned (all, attention, FFN, head), ViT and ViTBN, with a report")  # fmt: skip
    best = sub.add_parser("best", help="the best MNIST model per norm (ViT, ViTBN): every recipe, light "
                          "augmentation, a longer schedule, the epoch chosen on validation, with a report")  # fmt: skip
    for parser_, name in ((recipes, "recipes"), (norms, "norms"), (sam, "sam"), (augreg, "augreg"),
                          (transfer, "transfer"), (best, "best")):  # fmt: skip
        _common(parser_, RUN_FLAGS)
        parser_.add_argument("--full", action="store_true", help=f"the full-size preset {name}-full (for a GPU)")
        parser_.add_argument("--epochs", type=int, help="epochs of every training run")
        parser_.add_argument("--lr", nargs="+", type=float, help="a subset of the preset's learning rates")
        parser_.set_defaults(func=resumable(run_with_report), default_preset=name, report_kind=name)
    tune = sub.add_parser("tune", help="Ax/BoTorch tuning of lr and batch size per model, then the tuned models")
    _common(tune, {**RUN_FLAGS, **TUNE_FLAGS})
    tune.add_argument("--final-epochs", type=int, help="epochs of the tuned models' final training")
    tune.add_argument("--no-final", action="store_true", help="only tune, do not train the tuned models")
    tune.set_defaults(func=resumable(run_tune), default_preset="study-tune")


def resumable(run):
    """``run`` that, stopped by Ctrl-C, says how to go on: the same command again (finished runs are skipped, the
    interrupted one continues from its checkpoint), as ``vitbn train`` prints its ``--resume`` command."""

    def interrupted_says_how_to_resume(args: argparse.Namespace) -> int:
        from vitbn.provenance import command_line

        try:
            return run(args)
        except KeyboardInterrupt:
            print(f"vitbn experiment: interrupted; resume with the same command: {command_line()}", file=sys.stderr)
            return 130

    return interrupted_says_how_to_resume


def _setup_logging() -> None:
    """Progress lines of ``vitbn.experiments`` on the current stderr (a second call in one process replaces the
    handler, so a replaced stderr is followed)."""
    logger = logging.getLogger("vitbn.experiments")
    for old in [h for h in logger.handlers if getattr(h, "vitbn_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.vitbn_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def preset_from_args(args: argparse.Namespace, flags: dict):
    """The preset named by --preset/--config with the command-line overrides."""
    from vitbn.errors import UserError
    from vitbn.experiments.presets import load_preset, override_preset

    if args.preset and args.config:
        raise UserError("give --preset or --config, not both")
    preset = load_preset(args.preset or args.config or args.default_preset)
    run = given(args, flags)
    preset = override_preset(
        preset,
        lrs=getattr(args, "lr", None),
        models=_split(args.models),
        seeds=args.seeds,
        epochs=getattr(args, "epochs", None),
        run=run,
    )
    if getattr(args, "final_epochs", None) is not None:
        preset.final_epochs = args.final_epochs
    return preset


def _list_presets() -> int:
    from vitbn.experiments.presets import PRESETS

    for name, preset in sorted(PRESETS.items()):
        models = ", ".join(m.label for m in preset.models)
        print(f"{name:<11} {models}; lrs {preset.lrs}; seeds {preset.seeds}\n{'':<11} {preset.description}")
    return 0


def _report(args: argparse.Namespace, parent_id: str, preset) -> None:
    if args.report_dir:
        from vitbn.report import build_report

        report = build_report(parent_id, args.report_dir, tracking_uri=preset.run.get("track", {}).get("tracking_uri"))
        print(f"report: {report.markdown} and {report.html}")


def run_sweep(args: argparse.Namespace) -> int:
    from vitbn.experiments.lr_sweep import run_lr_sweep

    if args.list:
        return _list_presets()
    _setup_logging()
    preset = preset_from_args(args, RUN_FLAGS)
    result = run_lr_sweep(preset, progress=args.progress)
    print(
        f"lr-sweep {preset.name}: parent run {result.parent_id}; {result.count('new')} trained, "
        f"{result.count('resume')} resumed, {result.count('done')} already done"
    )
    _report(args, result.parent_id, preset)
    return 0


def run_with_report(args: argparse.Namespace) -> int:
    """``experiment recipes``, ``norms``, ``sam``, ``augreg``, ``transfer`` and ``best``: an lr sweep of the preset (the
    transfer: its pre-training, then the target runs), then the experiment's own report."""
    from vitbn.experiments.lr_sweep import run_lr_sweep
    from vitbn.experiments.transfer import run_transfer

    if args.list:
        return _list_presets()
    if args.full:
        args.default_preset = f"{args.report_kind}-full"
    _setup_logging()
    preset = preset_from_args(args, RUN_FLAGS)
    run = run_transfer if args.report_kind == "transfer" else run_lr_sweep  # the transfer has a phase after the sweep
    result = run(preset, progress=args.progress)
    print(f"{args.report_kind} {preset.name}: parent run {result.parent_id}; {result.count('new')} trained, "
          f"{result.count('resume')} resumed, {result.count('done')} already done")  # fmt: skip
    out = args.report_dir or f"reports/{preset.name}"
    uri = preset.run.get("track", {}).get("tracking_uri")
    if args.report_kind == "sam":
        from vitbn.cli.analyze import one_line_warnings
        from vitbn.experiments import sam

        with one_line_warnings("vitbn experiment sam"):  # e.g. power iteration that did not converge
            report = sam.build_sam_report(result.parent_id, out, tracking_uri=uri,
                                          options=sam.ANALYSIS_FULL if args.full else sam.ANALYSIS)  # fmt: skip
    else:
        from vitbn.experiments.augreg import build_augreg_report
        from vitbn.experiments.best import build_best_report
        from vitbn.experiments.norms import build_norms_report
        from vitbn.experiments.recipes import build_recipes_report
        from vitbn.experiments.transfer import build_transfer_report

        builders = {
            "norms": build_norms_report,
            "augreg": build_augreg_report,
            "transfer": build_transfer_report,
            "best": build_best_report,
        }
        build = builders.get(args.report_kind, build_recipes_report)
        report = build(result.parent_id, out, tracking_uri=uri)
        if args.report_kind == "best":
            from vitbn.experiments.best import keep_runs_for_demo

            print("\n".join(keep_runs_for_demo(report.table, args.out_dir or "runs")))
    print(f"report: {report.markdown} and {report.figure}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from vitbn.experiments.hpo import run_tuning

    if args.list:
        return _list_presets()
    _setup_logging()
    flags = {**RUN_FLAGS, **TUNE_FLAGS}
    preset = preset_from_args(args, flags)
    result = run_tuning(preset, final=not args.no_final, progress=args.progress)
    for label, (params, acc, index) in result.best.items():
        print(
            f"{label}: best lr={params['lr']:.4g} batch_size={params['batch_size']} estimated val_acc={acc:.4f} "
            f"(trial {index})"
        )
    print(f"tune {preset.name}: parent run {result.parent_id}")
    _report(args, result.parent_id, preset)
    return 0
