"""``fit``: the training loop with evaluation, timing, checkpoints, tracking and divergence detection."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitbn.config import RunConfig
from vitbn.engine.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    atomic_save,
    deferred_interrupt,
    export_model,
    load_checkpoint,
    load_model,
    restore_state,
    rng_state,
    set_rng_state,
)
from vitbn.engine.compiled import Compiled
from vitbn.engine.device import make_amp, resolve_device, seed_everything, set_tf32
from vitbn.engine.distributed import (
    DistInfo,
    any_rank,
    average_bn_buffers,
    from_main,
    init_distributed,
    reduce_evaluation,
    seed_rank_epoch,
    sum_over_ranks,
    wrap_ddp,
)
from vitbn.engine.evaluate import evaluate
from vitbn.engine.history import write_history
from vitbn.engine.optim import PRepBNSchedule, build_optimizer, build_scheduler
from vitbn.engine.progress import Progress
from vitbn.engine.runlog import close_tracking, log_attention_choices, start_tracking
from vitbn.engine.sam import SAM
from vitbn.engine.selection import BEST_NAME, Selection
from vitbn.engine.setup import (
    changed_settings,
    check_data_fits_model,
    check_sync_bn,
    default_run_name,
    make_loaders,
)
from vitbn.engine.step import make_loss, train_step
from vitbn.engine.timing import Stopwatch
from vitbn.errors import UserError
from vitbn.models.attention import load_attention_choices
from vitbn.runtime import configure_threads, tune_cpu_allocator
from vitbn.tracking import MemoryTracker, Tracker, make_tracker

__all__ = ["FINITE_CHECK_EVERY", "FitResult", "fit", "resolve_device"]

# Steps between checks of the running loss sum for NaN/inf: one host-device sync per this many steps.
FINITE_CHECK_EVERY = 50


@dataclass
class FitResult:
    """What ``fit`` returns. ``status``: ``"finished"``, ``"diverged"`` (a non-finite training loss) or
    ``"killed"`` (Ctrl-C; the last checkpoint resumes it)."""

    status: str
    history: list[dict]
    final: dict
    model: nn.Module
    run_id: str | None
    out_dir: Path


def fit(
    config: RunConfig,
    *,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    model: nn.Module | None = None,
    data=None,
    on_epoch: Callable[[dict], None] | None = None,
    progress: str | None = "auto",
) -> FitResult:
    """Trains a model as ``config`` says, evaluating, checkpointing and logging every epoch.

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``... in the environment) this is one rank of a data-parallel
    run: it joins the process group (gloo on the CPU, NCCL on CUDA), trains a DDP-wrapped model
    (``train.sync_bn``: with synchronized BatchNorm) on its part of every global batch of ``train.batch_size``
    images, and evaluates its share of the evaluation splits; every rank gets the same records. Rank 0 alone
    tracks and writes files. The caller leaves the process group (``destroy_distributed``).

    Args:
        config: the run; ``train.resume`` continues ``<train.out_dir>/<track.run_name>/checkpoint.pt``.
        tracker: where params, metrics and artifacts go; None: ``make_tracker(config.track)`` (MLflow, checked
            for reachability before anything else; a MemoryTracker when tracking is disabled). Ranks other
            than 0 always track into a MemoryTracker.
        parent_run_id: makes this a nested run of that run (sweeps).
        model: a model to train instead of ``build_model(config.model)``; its own config is logged.
        data: a ``vitbn.data.PreparedData`` instead of ``prepare_data(config.data)``.
        on_epoch: called with each epoch's record once it is logged and checkpointed.
        progress: ``"auto"``, ``"bar"``, ``"lines"`` or ``"none"`` (see ``Progress``).

    Returns:
        A FitResult; a diverged or interrupted run returns too (no exception), with its status.
    """
    info = init_distributed(resolve_device(config.train.device), sync_bn=config.train.sync_bn)
    if not info.is_main:
        tracker = MemoryTracker()  # tracking is rank 0's job
    elif tracker is None:
        tracker = make_tracker(config.track)
    return _Run(config, tracker, info, model=model, data=data, progress=progress).fit(parent_run_id, on_epoch)


class _Run:
    """One training run: built (device, data, model, optimizer, resume state) in ``__init__``, then ``fit``."""

    def __init__(
        self, config: RunConfig, tracker: Tracker, info: DistInfo, *, model, data, progress: str | None
    ) -> None:
        tc = config.train
        if tc.resume and not config.track.run_name:
            raise UserError("resume needs the name of the run to continue (track.run_name / --run-name)")
        self.tracker, self.info = tracker, info
        self.device = info.device(resolve_device(tc.device))
        self.amp = make_amp(tc.precision, self.device)
        if self.device.type == "cuda":
            set_tf32(tc.tf32)
        if self.device.type == "cpu":  # threads by the machine's load now; freed activations kept (vitbn.runtime)
            self.threads_choice = configure_threads(tc.threads)[1]
            tune_cpu_allocator()
        elif tc.threads:
            torch.set_num_threads(tc.threads)
            self.threads_choice = "requested"
        else:
            self.threads_choice = "default"
        seed_everything(tc.seed)  # the one place: model init, dropout, and the loaders' seed below
        if data is None:
            from vitbn.data import prepare_data

            data = prepare_data(config.data)
        self.data = data
        if model is None:
            from vitbn.models import build_model

            model = build_model(config.model)
        self.model = model.to(self.device)
        self.config = dataclasses.replace(config, model=model.config)
        check_data_fits_model(model.config, data.info)
        check_sync_bn(tc, model.config)
        self.loaders = make_loaders(data, tc, self.device, info, config.augment)
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc, len(self.loaders.train))
        self.loss_fn = make_loss(tc.label_smoothing)
        self.sam = SAM(self.optimizer, rho=tc.sam_rho, adaptive=tc.sam_adaptive) if tc.sam_rho else None
        self.prepbn = PRepBNSchedule.for_model(self.model, tc, len(self.loaders.train))
        self.clip_params = [p for p in self.model.parameters() if p.requires_grad]
        self.run_name = config.track.run_name or default_run_name(model.config.name)
        if info.distributed and not config.track.run_name:
            self.run_name = from_main(self.run_name)  # one run folder for all ranks
        self.out_dir = Path(tc.out_dir) / self.run_name
        self.progress = Progress(progress if info.is_main else "none", tc.epochs)
        self.history: list[dict] = []
        self.start_epoch, self.run_id, self._rng, self._started = 0, None, None, False
        self.attn_choices: dict[str, str] = {}  # what attn_impl="auto" chose (runlog.log_attention_choices)
        self.attn_tagged: dict[str, str] = {}
        self._load_checkpoint()  # every rank loads the same checkpoint
        self.selection = Selection.from_history(self.history, tc.early_stopping)
        if tc.early_stopping and data.val is None:
            raise UserError("early_stopping needs a validation split: set data.val_size or data.val_fraction")
        self._wrap(tc.sync_bn, tc.compile)

    def _set_lambda(self, steps_done: int) -> None:
        if self.prepbn is not None:
            self.prepbn.set(steps_done)

    def _wrap(self, sync_bn: bool, compile: bool) -> None:
        """Sets the modules that train (``net``) and evaluate (``eval_net``), each a ``Compiled``.

        Training runs DDP over ``model`` in a distributed run (its BatchNorms converted in place to SyncBN if
        ``sync_bn``; the parameters stay those the optimizer holds), else ``model`` itself, and then both stages
        share one ``Compiled``. Evaluation and export use ``model``: the DDP wrapper's forward broadcasts
        buffers, a collective."""
        train_net = wrap_ddp(self.model, sync_bn=sync_bn, device=self.device)
        self.net = Compiled(train_net, compile)
        self.eval_net = self.net if train_net is self.model else Compiled(self.model, compile)

    def _load_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT_NAME
        if not path.exists():
            if self.config.train.resume:
                self.progress.message(f"no checkpoint in {self.out_dir}; starting run {self.run_name!r} afresh")
            return
        if not self.config.train.resume:
            raise UserError(
                f"{self.out_dir} already holds a run; pass --resume to continue it or pick another run name"
            )
        ckpt = load_checkpoint(path)
        changed = changed_settings(ckpt["config"], self.config.to_dict())
        if changed:
            warnings.warn(f"resuming {self.run_name!r} with changed settings: {', '.join(changed)}", stacklevel=3)
        for note in restore_state(ckpt, path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                  scaler=self.amp.scaler, train=self.config.train,
                                  steps_per_epoch=len(self.loaders.train)):  # fmt: skip
            warnings.warn(note, stacklevel=3)
        self.history, self.start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
        self.run_id, self._rng = ckpt.get("run_id"), ckpt["rng"]
        self.attn_choices = dict(ckpt.get("attn_choices") or {})
        load_attention_choices(self.attn_choices)  # the paths the run took so far, not measured again

    def fit(self, parent_run_id: str | None, on_epoch: Callable[[dict], None] | None) -> FitResult:
        try:
            start_tracking(self, parent_run_id)
            if self._rng is not None:  # resume: continue the random streams where the checkpoint left them
                set_rng_state(self._rng)
            elif self.info.is_main:  # epoch 0: Ctrl-C in the first epoch leaves a run that --resume continues
                with deferred_interrupt():
                    atomic_save(self._checkpoint_state(0), self.out_dir / CHECKPOINT_NAME)
            status = self._loop(on_epoch)
            final = self._final_metrics(status)
        except KeyboardInterrupt:
            status, final = "killed", self._last_metrics()
            if not self._started:
                raise
        except BaseException:
            if self._started:
                close_tracking(self, "failed", quiet=True)
            raise
        finally:
            self.progress.close()
        close_tracking(self, status)
        return FitResult(status, self.history, final, self.model, self.run_id, self.out_dir)

    def _loop(self, on_epoch: Callable[[dict], None] | None) -> str:
        for epoch in range(self.start_epoch + 1, self.config.train.epochs + 1):
            compiling = self.net.first_call("train") or self.eval_net.first_call("evaluation")
            record = self._train_epoch(epoch)
            if self.config.train.compile:
                # The epoch whose times include torch.compile's first compilation (of training or evaluation): its
                # time and throughput are not the steady state. Later recompilations (a new batch shape, PRepBN's
                # phase) are not flagged.
                record["time/includes_compile"] = float(compiling)
            if math.isnan(record["train/loss"]):
                self._record(record, checkpoint=False)
                return "diverged"
            record.update(self._evaluate_epoch(epoch))
            self._record(record, checkpoint=True, best=self.selection.update(record))
            if on_epoch is not None:
                on_epoch(record)
            if self.selection.should_stop:
                self.progress.message(f"early stop after epoch {epoch}: no better val accuracy since epoch "
                                      f"{self.selection.best_epoch}")  # fmt: skip
                self.tracker.set_tags({"vitbn.stopped_early": epoch})
                break
        return "finished"

    def _train_epoch(self, epoch: int) -> dict:
        loader, opt = self.loaders.train, self.optimizer
        loader.set_epoch(epoch)
        if self.info.distributed:
            seed_rank_epoch(self.config.train.seed, epoch, self.info)
        self.net.module.train()
        # Running sums stay on the device: no host sync per step (one per FINITE_CHECK_EVERY steps).
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        steps = samples = 0
        lr = opt.param_groups[0]["lr"]
        done = (epoch - 1) * len(loader)  # optimizer steps before this epoch: PRepBN's lambda is a function of it
        self._set_lambda(done)
        self.progress.start_epoch(epoch, len(loader))
        with Stopwatch(self.device) as watch:
            for x, y in loader:
                lr = opt.param_groups[0]["lr"]
                loss, hits = self._step(x, y)
                loss_sum += loss
                correct += hits
                steps, samples = steps + 1, samples + y.shape[0]
                self._set_lambda(done + steps)
                if self.scheduler is not None:
                    self.scheduler.step()
                self.progress.step()
                if steps % FINITE_CHECK_EVERY == 0 and self._any_rank(not torch.isfinite(loss_sum)):
                    break
        mean_loss, hits, seconds = loss_sum.item() / steps, correct.item(), watch.seconds
        if self.info.distributed:  # every rank ran the same steps: the global batch's loss is the ranks' mean
            mean_loss, hits, samples, seconds = sum_over_ranks([mean_loss, hits, samples, seconds])
            mean_loss, seconds = mean_loss / self.info.world_size, seconds / self.info.world_size
        record = {
            "epoch": epoch,
            "train/loss": mean_loss if math.isfinite(mean_loss) else math.nan,
            "train/acc": hits / samples,
            "time/train_epoch_s": seconds,
            "throughput/train_img_s": samples / seconds,
            "lr": lr,
        }
        if self.prepbn is not None:
            record["prepbn/lambda"] = self.prepbn.value  # what evaluation and the checkpoint hold
        return record

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or'ed over the ranks, so that all ranks take the same branch (a collective: every rank
        must call it at the same step)."""
        return any_rank(bool(flag)) if self.info.distributed else bool(flag)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tc = self.config.train
        return self.net.run("train", train_step, x, y, self.optimizer, self.loss_fn, amp=self.amp,
                            grad_clip=tc.grad_clip, clip_params=self.clip_params, sam=self.sam)  # fmt: skip

    def _evaluate(self, loader) -> dict:
        kwargs = dict(device=self.device, precision=self.config.train.precision,
                      num_classes=self.model.config.num_classes)  # fmt: skip
        out = self.eval_net.run("evaluation", evaluate, loader, **kwargs)
        return reduce_evaluation(out) if self.info.distributed else out

    def _evaluate_epoch(self, epoch: int) -> dict:
        tc, record = self.config.train, {}
        if tc.precise_bn and self.model.config.uses_batchnorm:
            from vitbn.bn import recompute_bn_stats

            self.loaders.bn.set_epoch(epoch)
            batches = min(tc.precise_bn_batches, len(self.loaders.bn))
            pooled = {"all_reduce": True} if self.info.distributed else {}  # every rank: all ranks' batches
            with Stopwatch(self.device) as watch:
                recompute_bn_stats(self.model, self.loaders.bn, batches, **pooled)
            record["time/precise_bn_s"] = watch.seconds
        elif self.info.distributed and not tc.sync_bn and self.model.config.uses_batchnorm:
            average_bn_buffers(self.model)  # else each rank would evaluate (and rank 0 save) its own statistics
        splits = {"val": self.loaders.val, "test": self.loaders.test if self.config.data.test_every_epoch else None}
        seconds = [self._log_split(record, split, loader) for split, loader in splits.items() if loader is not None]
        if seconds:
            record["time/eval_epoch_s"] = sum(seconds)
        return record

    def _log_split(self, record: dict, split: str, loader) -> float:
        result = self._evaluate(loader)
        record[f"{split}/loss"], record[f"{split}/acc"] = result["loss"], result["acc"]
        for k, acc in enumerate(result["per_class_acc"]):
            record[f"{split}/acc_class_{k}"] = acc
        record[f"time/{split}_epoch_s"] = result["seconds"]
        return result["seconds"]

    def _record(self, record: dict, *, checkpoint: bool, best: bool = False) -> None:
        """Logs an epoch and writes its checkpoint (and ``best.pt`` if ``best``); Ctrl-C waits until done."""
        with deferred_interrupt():
            self.history.append(record)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
            log_attention_choices(self)
            if self.info.is_main:
                write_history(self.history, self.out_dir)
                if best:
                    export_model(self.model, self.out_dir / BEST_NAME, self.data, meta=self.selection.metrics())
                if checkpoint:
                    atomic_save(self._checkpoint_state(record["epoch"]), self.out_dir / CHECKPOINT_NAME)
        self.progress.end_epoch(record)

    def _checkpoint_state(self, epoch: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler is not None else None,
            "rng": rng_state(),
            "epoch": epoch,
            "history": self.history,
            "config": self.config.to_dict(),
            "run_id": self.run_id,
            "run_name": self.run_name,
            "attn_choices": self.attn_choices,
        }

    def _last_metrics(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {k: v for k, v in last.items() if k.split("/")[0] in ("train", "val", "test")}

    def _final_metrics(self, status: str) -> dict:
        """The last epoch's metrics; a finished run evaluates the test set now if it was not every epoch,
        and exports the model."""
        final = self._last_metrics()
        if status != "finished":
            return final
        step = self.history[-1]["epoch"] if self.history else 0
        if not self.config.data.test_every_epoch:
            record: dict = {}
            self._log_split(record, "test", self.loaders.test)
            self.tracker.log_metrics(record, step=step)
            final.update({k: v for k, v in record.items() if k.startswith("test/")})
        if self.selection.best_epoch is not None:
            best = {**self.selection.metrics(), "best/test_acc": self._best_test_acc(final)}
            self.tracker.log_metrics(best, step=step)
            final.update(best)
        if self.info.is_main:
            export_model(self.model, self.out_dir / MODEL_NAME, self.data)
        return final

    def _best_test_acc(self, final: dict) -> float:
        """The test accuracy of the epoch that validation chose: from its record, from the last evaluation, or
        evaluated now with the best epoch's weights (then the last weights are put back)."""
        best = self.selection.best_epoch
        if self.config.data.test_every_epoch:
            return next(r["test/acc"] for r in self.history if r["epoch"] == best)
        if best == self.history[-1]["epoch"]:
            return final["test/acc"]
        last = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(load_model(self.out_dir / BEST_NAME).state_dict())
        try:
            return self._evaluate(self.loaders.test)["acc"]
        finally:
            self.model.load_state_dict(last)
