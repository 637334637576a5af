"""What a run builds before its first step: loaders, run folder name, logged params, resume checks."""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass

import torch

from vitbn.config import AugmentConfig, ModelConfig, RunConfig, TrainConfig, flatten, pair
from vitbn.engine.distributed import DistInfo, RankLoader, eval_share
from vitbn.errors import UserError

# Settings that may change when a run is resumed without changing its numbers (or by intent: epochs).
RESUMABLE_CHANGES = ("train.epochs", "train.resume", "train.device", "train.threads", "train.out_dir", "track.")


@dataclass
class Loaders:
    """The batches of a run: training (shuffled, seeded per epoch), evaluation splits in order, and the
    training batches that re-estimate BatchNorm statistics (precise BN)."""

    train: object
    val: object | None
    test: object
    bn: object


def make_loaders(
    data, tc: TrainConfig, device: torch.device, info: DistInfo | None = None, augment: AugmentConfig | None = None
) -> Loaders:
    """InMemoryLoaders over ``data`` (a ``vitbn.data.PreparedData``) on ``device``; in a distributed run
    (``info``), this rank's part of each global batch (``RankLoader``) and its share of the evaluation
    splits. ``augment`` (when it is on) transforms the training batches only: evaluation and the precise-BN
    batches see the images as they are."""
    from vitbn.data import InMemoryLoader

    rank, world = (info.rank, info.world_size) if info is not None and info.distributed else (0, 1)
    common = dict(mean=data.info.mean, std=data.info.std, device=device)
    augmenter = None
    if augment is not None and augment.enabled:
        from vitbn.data.augment import Augmenter

        augmenter = Augmenter(augment, num_classes=len(data.info.classes), seed=tc.seed + 1000 * rank)
    train = InMemoryLoader(data.train, batch_size=tc.batch_size, shuffle=True, seed=tc.seed,
                           max_batches=tc.max_steps_per_epoch, augment=augmenter, **common)  # fmt: skip
    bn = InMemoryLoader(data.train, batch_size=tc.batch_size, shuffle=True, seed=tc.seed + 1,
                        max_batches=tc.precise_bn_batches, **common)  # fmt: skip
    if world > 1:
        train, bn = RankLoader(train, rank, world), RankLoader(bn, rank, world)
    if len(train) == 0:
        raise UserError(f"the training set of {data.info.name!r} is empty; check train_subset / val_size")

    def evaluation(split):
        split = eval_share(split, rank, world) if world > 1 else split
        return InMemoryLoader(split, batch_size=tc.eval_batch_size, **common)

    val = evaluation(data.val) if data.val is not None else None
    return Loaders(train=train, val=val, test=evaluation(data.test), bn=bn)


def check_data_fits_model(config: ModelConfig, info) -> None:
    """The images of the dataset must have the model's shape, and its classes fit the head."""
    h, w = pair(config.image_size)
    expected = (config.channels, h, w)
    if tuple(info.shape) != expected:
        raise UserError(
            f"model {config.name!r} takes images of shape {expected} (C, H, W) but dataset {info.name!r} has "
            f"{tuple(info.shape)}; set model.channels / model.image_size"
        )
    if len(info.classes) > config.num_classes:
        raise UserError(
            f"dataset {info.name!r} has {len(info.classes)} classes but model {config.name!r} has "
            f"num_classes={config.num_classes}"
        )


def check_sync_bn(tc: TrainConfig, config: ModelConfig) -> None:
    """SyncBN takes BatchNorm statistics over the whole global batch; ghost BN over sub-batches: not both."""
    if tc.sync_bn and config.ghost_batch_size is not None:
        raise UserError(
            f"sync_bn and model.ghost_batch_size={config.ghost_batch_size} exclude each other: SyncBN normalizes "
            "over the whole global batch, ghost BN over sub-batches; drop one"
        )


def default_run_name(model_name: str) -> str:
    """``<model>-<YYYYmmdd-HHMMSS>-<4 hex>``: unique even for runs started in the same second."""
    return f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def changed_settings(saved: dict, current: dict) -> list[str]:
    """Dotted config keys whose value differs between a checkpoint's config and the current one, leaving out
    those a resume may change."""
    old, new = flatten(saved), flatten(current)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def run_params(config: RunConfig, model: torch.nn.Module) -> dict:
    """The MLflow params of a run: the whole config flattened with dots (without ``train.resume``, an action
    rather than a setting), the parameter count and the forward FLOPs per image."""
    from vitbn.models import count_params, forward_flops

    params = {k: v for k, v in flatten(config.to_dict()).items() if k != "train.resume"}
    params["model.num_params"] = count_params(model)
    with torch.random.fork_rng(devices=[]):  # the FLOP probe draws a random image: keep the run's RNG stream
        params["model.flops_per_image"] = forward_flops(copy.deepcopy(model).cpu())
    return params
