"""Experiment recipes: which models (at which depth), learning rates, seeds and shared run settings.

A preset is plain data; ``configs/<name>.yaml`` holds the same recipe in the format ``load_preset`` reads, so a
recipe can be copied and edited without touching the code.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitbn.config import VIT_CIFAR, RunConfig, load_yaml, save_yaml, to_dict
from vitbn.errors import UserError
from vitbn.models import list_models

# The article's training recipe (experiment 1): Adam, cross-entropy, batch 100, test batch 5000, constant lr,
# no dropout, no augmentation, the test set evaluated after every epoch.
STUDY_RUN: dict[str, Any] = {
    "model": {"dropout": 0.0, "emb_dropout": 0.0},
    "data": {"dataset": "mnist", "val_size": 0, "test_every_epoch": True},
    "train": {
        "epochs": 30,
        "batch_size": 100,
        "eval_batch_size": 5000,
        "optimizer": "adam",
        "schedule": "constant",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "precision": "fp32",
    },
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison: a registered preset at a depth, with optional extra ModelConfig fields."""

    name: str
    depth: int
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    variant: str = ""  # names a recipe (``"par3x2"``): models of one name and depth told apart
    train: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # TrainConfig fields of this entry
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # DataConfig fields of this entry
    augment: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # AugmentConfig fields

    @property
    def label(self) -> str:
        """``"vitbn-d1"`` (or ``"vitbn-hmlp4"`` with a variant): the name used in run names, tags and reports."""
        return f"{self.name}-{self.variant}" if self.variant else f"{self.name}-d{self.depth}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "depth": self.depth,
            **({"overrides": dict(self.overrides)} if self.overrides else {}),
            **({"variant": self.variant} if self.variant else {}),
            **({"train": dict(self.train)} if self.train else {}),
            **({"data": dict(self.data)} if self.data else {}),
            **({"augment": dict(self.augment)} if self.augment else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        keys = ("name", "depth", "overrides", "variant", "train", "data", "augment")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise UserError(f"unknown model entry key(s) {unknown}; allowed: {', '.join(keys)}")
        if data.get("name") not in list_models():
            raise UserError(f"model {data.get('name')!r} is not one of {', '.join(list_models())}")
        depth = data.get("depth")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 0:
            raise UserError(f"model {data['name']!r}: depth={depth!r} must be a positive integer")
        variant = str(data.get("variant") or "")
        return cls(name=data["name"], depth=depth, overrides=dict(data.get("overrides") or {}), variant=variant,
                   train=dict(data.get("train") or {}), data=dict(data.get("data") or {}),
                   augment=dict(data.get("augment") or {}))  # fmt: skip


@dataclass
class ExperimentPreset:
    """A recipe for ``vitbn experiment lr-sweep`` (models x lrs x seeds) and ``vitbn experiment tune``.

    Attributes:
        name: the parent MLflow run's name and the ``vitbn.preset`` tag.
        description: one line shown in reports.
        models: the models compared.
        lrs: learning rates of the sweep (empty in tuning presets: the tuning searches its own).
        seeds: training seeds; every (model, lr) is trained once per seed.
        run: RunConfig sections shared by every run; ``model`` holds fields applied to every model.
        final_epochs: tuning only: epochs of the tuned models' final training (None: ``run.train.epochs``).
    """

    name: str
    description: str
    models: list[ModelSpec]
    lrs: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    run: dict[str, Any] = field(default_factory=dict)
    final_epochs: int | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError(f"preset {self.name!r} has no models")
        if any(not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0 for lr in self.lrs):
            raise UserError(f"preset {self.name!r}: lrs={self.lrs!r} must be a list of positive numbers")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise UserError(f"preset {self.name!r}: seeds={self.seeds!r} must be a non-empty list of integers >= 0")
        if self.final_epochs is not None and (not isinstance(self.final_epochs, int) or self.final_epochs <= 0):
            raise UserError(f"preset {self.name!r}: final_epochs={self.final_epochs!r} must be a positive integer")
        self.lrs = [float(lr) for lr in self.lrs]
        self.base_config(self.models[0])  # validates the shared sections now, with a one-line error

    def base_config(self, spec: ModelSpec, lr: float | None = None, seed: int | None = None) -> RunConfig:
        """The RunConfig of one run: the shared sections, the model preset at its depth, the lr and seed."""
        data = copy.deepcopy(self.run)
        data["model"] = {**(data.get("model") or {}), **spec.overrides, "name": spec.name, "depth": spec.depth}
        train = data.setdefault("train", {})
        train.update(spec.train)
        data["data"] = {**(data.get("data") or {}), **spec.data}
        if spec.augment:
            data["augment"] = {**(data.get("augment") or {}), **spec.augment}
        if lr is not None:
            train["lr"] = float(lr)
        if seed is not None:
            train["seed"] = int(seed)
        try:
            return RunConfig.from_dict(data)
        except ValueError as exc:
            raise UserError(f"preset {self.name!r}: {exc}") from None

    def shared_hash(self) -> str:
        """A short hash of the shared settings (without the lrs, seeds, models, tracking, output folder, number
        of trials and final epochs): runs of presets with the same hash are comparable, so a re-run (or a subset of
        lrs, seeds or models, or more trials) joins the same parent."""
        run = {k: dict(v) for k, v in self.run.items() if k != "track"}  # where runs are logged: not what they are
        run.get("train", {}).pop("out_dir", None)
        run.get("hpo", {}).pop("trials", None)  # a budget: a larger one continues the same tuning
        return hashlib.sha1(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "description": self.description,
            "models": [m.to_dict() for m in self.models],
            "lrs": list(self.lrs),
            "seeds": list(self.seeds),
            "run": copy.deepcopy(self.run),
        }
        if self.final_epochs is not None:
            out["final_epochs"] = self.final_epochs
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentPreset:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UserError(f"unknown preset key(s) {unknown}; allowed: {', '.join(names)}")
        missing = [k for k in ("name", "models") if k not in data]
        if missing:
            raise UserError(f"preset is missing key(s) {missing}")
        return cls(
            **{
                **data,
                "models": [ModelSpec.from_dict(m) for m in data["models"]],
                "description": data.get("description", ""),
            }
        )


def _with(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` with some sections updated (a deep copy)."""
    out = copy.deepcopy(base)
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value}
    return out


def _models(*pairs: tuple[str, int]) -> list[ModelSpec]:
    return [ModelSpec(name, depth) for name, depth in pairs]


_STUDY_MODELS = _models(("vit", 6), ("vitbnffn", 1), ("vitbn", 1))
_FAIR_MODELS = _models(("vit", 1), ("vitbnffn", 1), ("vitbn", 1), ("vit", 6), ("vitbnffn", 6), ("vitbn", 6))
_FAIR_RUN = _with(STUDY_RUN, data={"val_size": 10000, "test_every_epoch": False})
# The fair study on a 2-core CPU budget: 12000 training images of which 2000 held out for validation, the whole test
# set once at the end, 8 epochs; fp32 (bf16 runs slower than fp32 on CPUs without AVX-512 BF16).
_FAIR_CPU_RUN = _with(_FAIR_RUN, data={"train_subset": 12000, "val_size": 2000}, train={"epochs": 8})
# 5000 training and 5000 test images, 3 epochs (epoch 1 is left out of the time medians as warm-up): about 2.5
# minutes for the 8 runs on 2 CPU cores, most of it in the depth-6 ViT.
_QUICK_RUN = _with(STUDY_RUN, data={"train_subset": 5000, "test_subset": 5000}, train={"epochs": 3})


def _recipe_models(names: tuple[str, ...] = ("vit", "vitbn")) -> list[ModelSpec]:
    """Touvron et al.'s recipes on a depth-6 model (experiment ``recipes``): sequential, 3 stages of 2 parallel
    blocks, + LayerScale (CaiT's 0.1 for depths up to 18), + stochastic depth 0.1, and at patch 4 (hMLP needs a
    patch with factors) the hMLP stem against the linear one."""
    recipes = (
        ("seq6", 6, {}),
        ("par3x2", 3, {"parallel": 2}),
        ("ls", 6, {"layer_scale": 0.1}),
        ("dp0.1", 6, {"drop_path": 0.1}),
        ("linear4", 6, {"patch_size": 4}),
        ("hmlp4", 6, {"patch_size": 4, "stem": "hmlp"}),
    )
    return [ModelSpec(name, depth, overrides, variant) for name in names for variant, depth, overrides in recipes]


# 8000 training and 2000 test images, 3 epochs, fp32: about 25 minutes for the 12 runs on 2 quiet CPU cores, the
# patch-4 runs (50 tokens) most of it. fp32, not bf16: an AVX2 CPU without bf16 instructions (this project's machine)
# runs bf16 products in a slow reference kernel, ~7x fp32.
_RECIPES_RUN = _with(STUDY_RUN, data={"train_subset": 8000, "test_subset": 2000}, train={"epochs": 3})

# The norms experiment: one depth-6 ViT recipe, each normalization in turn. Variant -> (preset, overrides).
NORM_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ln": ("vit", {}),
    "rms": ("vit", {"norm": "rms"}),
    "dyt": ("vit", {"norm": "dyt"}),
    "bnffn": ("vitbnffn", {}),
    "bn": ("vitbn", {}),
    "prepbn": ("vit", {"norm": "prepbn"}),
}


def _norm_models(depth: int = 6) -> list[ModelSpec]:
    """LayerNorm, RMSNorm, DyT and PRepBN in the ViT's norm slots, and the study's two BatchNorm placements
    (ViTBNFFN, ViTBN), all at one depth (experiment ``norms``)."""
    return [ModelSpec(name, depth, overrides, variant) for variant, (name, overrides) in NORM_VARIANTS.items()]


# 12000 training images (2000 of them the validation split that selects the lr), 5000 test images, 4 epochs, fp32:
# about 45 minutes for the 36 runs on 2 quiet CPU cores. norms-full is the full-size one (for a GPU).
_NORMS_RUN = _with(STUDY_RUN, data={"train_subset": 12000, "test_subset": 5000, "val_size": 2000,
                                    "test_every_epoch": False}, train={"epochs": 4})  # fmt: skip


def _sam_models(depth: int = 6, rho: float = 0.05) -> list[ModelSpec]:
    """Chen et al. 2021 (experiment ``sam``): ViT (LayerNorm) and ViTBN at one depth, each trained with Adam and
    with Adam + SAM (same lr, epochs and seed)."""
    return [
        ModelSpec(name, depth, variant=variant, train=train)
        for name in ("vit", "vitbn")
        for variant, train in (("adam", {}), ("sam", {"sam_rho": rho}))
    ]


# 10000 training and 5000 test images, 15 epochs, fp32: a regime where a depth-6 ViT overfits (train loss near 0),
# which is where SAM is claimed to help; about 35 minutes for the 4 runs on 2 quiet CPU cores (SAM doubles the
# cost of a step), plus the analyses. sam-full is the full-size one (for a GPU).
_SAM_RUN = _with(STUDY_RUN, data={"train_subset": 10000, "test_subset": 5000}, train={"epochs": 15})

# AugReg (Steiner et al. 2021): regularization "0.1" is dropout 0.1 and stochastic depth 0.1; every cell trains with
# AdamW and weight decay 0.05 (none on norms, biases and embeddings), so that only augmentation and dropout vary.
AUGREG_LEVELS = ("none", "light", "medium", "heavy")
AUGREG_REG = {"reg0": {}, "reg0.1": {"dropout": 0.1, "drop_path": 0.1}}


def _augreg_models(depth: int, sizes: dict[str, tuple[int, int]], names=("vit", "vitbn")) -> list[ModelSpec]:
    """Experiment ``augreg``: per model, training-set size (``label: (images, epochs)``), augmentation level and
    regularization, one entry named ``<size>-<level>-<reg>`` (e.g. ``vit-1k-medium-reg0.1``); each holds out a
    stratified tenth of its images for validation, which chooses the epoch (``best/test_acc``)."""
    return [
        ModelSpec(
            name,
            depth,
            reg,
            f"{size}-{level}-{reg_name}",
            train={"epochs": epochs},
            data={"train_subset": images},
            augment={"level": level},
        )  # fmt: skip
        for name in names
        for size, (images, epochs) in sizes.items()
        for level in AUGREG_LEVELS
        for reg_name, reg in AUGREG_REG.items()
    ]


_AUGREG_RUN = _with(STUDY_RUN, data={"val_fraction": 0.1, "test_every_epoch": False},
                    train={"optimizer": "adamw", "weight_decay": 0.05})  # fmt: skip

# Experiment ``best``: the best MNIST model this toolkit trains, per norm (ViT and ViTBN), all recipes on: 3 stages
# of 2 parallel blocks (Touvron et al. 2022; the same 0.89M parameters as the study's depth-6 ViT, and faster),
# stochastic depth 0.1, AdamW (weight decay 0.05, none on norms, biases, embeddings), label smoothing 0.1, lr 0.001
# after a 2-epoch warm-up then cosine to 0, batch 128, and AugReg's light augmentation for digits (translation by up
# to 2 pixels) with rotations up to 10 degrees (no flips). The epoch is chosen on a stratified 10% validation split;
# the test set is read once, for the chosen checkpoint.
BEST_MODELS = [ModelSpec(name, 3, {"parallel": 2, "drop_path": 0.1}, "best") for name in ("vit", "vitbn")]
_BEST_RUN = _with(
    STUDY_RUN,
    data={"val_fraction": 0.1, "test_every_epoch": False},
    train={"epochs": 20, "batch_size": 128, "optimizer": "adamw", "weight_decay": 0.05, "schedule": "cosine",
           "warmup_epochs": 2.0, "label_smoothing": 0.1},
    augment={"level": "light", "rotate": 10.0},
)  # fmt: skip

# CIFAR-10 (natural 32x32 RGB images; vitbn.config.VIT_CIFAR, the ViT-Lite-7/4-class model of 3.72M parameters).
# The recipe the from-scratch CIFAR ViTs share: AdamW (weight decay 0.05), label smoothing 0.1, warm-up then cosine
# decay, batch 128, pad-4 random crop and horizontal flip; the epoch (and in the norms study the lr) is chosen on a
# stratified 10% validation split and the test set is read once at the end.
_CIFAR_RUN = _with(
    STUDY_RUN,
    data={"dataset": "cifar10", "val_fraction": 0.1, "test_every_epoch": False},
    train={"batch_size": 128, "eval_batch_size": 1000, "optimizer": "adamw", "weight_decay": 0.05,
           "schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.1},
    augment={"level": "natural-light"},
)  # fmt: skip
_CIFAR_MODELS = [ModelSpec("vit-cifar", 7), ModelSpec("vitbn-cifar", 7)]
# cifar's budget (meant to finish in under an hour on a 2-core CPU; not yet timed): the first 10000 training images
# (9000 trained on, 1000 validation), 4 epochs, 5000 test images, the two models: 2 x 9000 x 4 = 72000 training image
# passes of 1.53 GFLOP each (forward + backward of the 3.72M-parameter model at 65 tokens), about 110 TFLOP, plus
# 2 x (4 x 1000 + 5000) evaluated images of 0.51 GFLOP (9 TFLOP).
_CIFAR_CPU_RUN = _with(_CIFAR_RUN, data={"train_subset": 10000, "test_subset": 5000}, train={"epochs": 4})
# cifar-full (for a GPU): Compact Transformers' 300-epoch recipe on a model of their CVT-7/4's size: all 50000
# images (5000 for validation), AdamW lr 5e-4, 10 warm-up epochs, RandAugment (2, 9), Mixup 0.8 / CutMix 1.0,
# stochastic depth 0.1, bf16. The target: >= 94% test accuracy (CVT-7/4's at 300 epochs).
_CIFAR_FULL_RUN = _with(
    _CIFAR_RUN,
    model={"drop_path": 0.1},
    train={"epochs": 300, "warmup_epochs": 10.0, "precision": "bf16"},
    augment={"level": "natural-heavy", "randaug_magnitude": 9},
)  # fmt: skip
# The norms study on CIFAR-10, as ``norms`` on MNIST (the same six variants, lr chosen on validation, 2 seeds). The
# CPU version trains a narrower model (dim 128, 4 heads of 32, MLP 256, depth 4: 0.55M parameters, 0.23 GFLOP per
# training image pass) so that its 36 runs fit in under two hours (not yet timed): 36 runs x 8000 images x 4 epochs
# = 1.15M image passes, about 270 TFLOP, plus 36 x (4 x 2000 + 5000) evaluated images (36 TFLOP).
_NORMS_CIFAR_MODEL = {"image_size": 32, "patch_size": 4, "channels": 3, "dim": 128, "heads": 4, "dim_head": 32,
                      "mlp_dim": 256}  # fmt: skip
_NORMS_CIFAR_RUN = _with(_CIFAR_RUN, model=_NORMS_CIFAR_MODEL,
                         data={"train_subset": 10000, "test_subset": 5000, "val_fraction": 0.2},
                         train={"epochs": 4})  # fmt: skip
_NORMS_CIFAR_FULL_RUN = _with(
    _CIFAR_RUN,
    model={k: v for k, v in VIT_CIFAR.items() if k not in ("depth", "num_classes")},
    train={"epochs": 200, "warmup_epochs": 10.0, "precision": "bf16"},
    augment={"level": "natural-medium"},
)  # fmt: skip

PRESETS: dict[str, ExperimentPreset] = {
    p.name: p
    for p in (
        ExperimentPreset(
            name="study",
            description="The article's experiment 1 as published: ViT at depth 6 against the BN models at depth 1 "
            "(what its code ran), 30 epochs, test set after every epoch.",
            models=_STUDY_MODELS,
            lrs=[0.0005, 0.005, 0.01],
            seeds=[0],
            run=STUDY_RUN,
        ),
        ExperimentPreset(
            name="fair",
            description="The three models at equal depth (1 and 6), 30 epochs, selection on a 10000-image "
            "validation split, the test set once at the end, 2 seeds.",
            models=_FAIR_MODELS,
            lrs=[0.0005, 0.005, 0.01],
            seeds=[0, 1],
            run=_FAIR_RUN,
        ),
        ExperimentPreset(
            name="fair-cpu",
            description="The fair study on a 2-core CPU budget: the three models at equal depth (1 and 6), "
            "lrs 0.0005, 0.005, 0.01, seeds 0 and 1, 8 epochs on 10000 training images, lr chosen on a 2000-image "
            "validation split, the whole test set once at the end, fp32 (the fair preset is the full one).",
            models=_FAIR_MODELS,
            lrs=[0.0005, 0.005, 0.01],
            seeds=[0, 1],
            run=_FAIR_CPU_RUN,
        ),
        ExperimentPreset(
            name="quick",
            description="A few minutes on a laptop CPU: the three models at depth 1 and the study's depth-6 ViT, "
            "5000 training and 5000 test images, 3 epochs, 2 learning rates.",
            models=_models(("vit", 1), ("vitbnffn", 1), ("vitbn", 1), ("vit", 6)),
            lrs=[0.0005, 0.005],
            seeds=[0],
            run=_QUICK_RUN,
        ),
        ExperimentPreset(
            name="recipes",
            description="Touvron et al. 2022 on MNIST: ViT and ViTBN at depth 6, sequential vs 3x2 parallel, "
            "+ LayerScale, + stochastic depth, hMLP vs linear stem at patch 4; 8000 training and 2000 test "
            "images, 3 epochs, fp32, lr 0.0005, seed 0 (a 2-core CPU budget; recipes-full is the full one).",
            models=_recipe_models(),
            lrs=[0.0005],
            seeds=[0],
            run=_RECIPES_RUN,
        ),
        ExperimentPreset(
            name="recipes-full",
            description="The recipes experiment at full size (for a GPU): all 60000 training images, 30 epochs, "
            "bf16, lr 0.0005, seeds 0 and 1.",
            models=_recipe_models(),
            lrs=[0.0005],
            seeds=[0, 1],
            run=_with(STUDY_RUN, train={"precision": "bf16"}),
        ),
        ExperimentPreset(
            name="norms",
            description="LayerNorm, RMSNorm, DyT, BN in the feed-forward block (ViTBNFFN), BN everywhere (ViTBN) "
            "and PRepBN everywhere, each on a depth-6 ViT, at 3 learning rates, 2 seeds, the lr selected on a "
            "2000-image validation split; 10000 training and 5000 test images, 4 epochs, fp32 (a 2-core CPU "
            "budget; norms-full is the full one).",
            models=_norm_models(),
            lrs=[0.0005, 0.005, 0.01],
            seeds=[0, 1],
            run=_NORMS_RUN,
        ),
        ExperimentPreset(
            name="norms-full",
            description="The norms experiment at full size (for a GPU): 60000 training images (10000 of them for "
            "validation), the 10000 test images, 30 epochs, bf16, 3 learning rates, seeds 0 to 2.",
            models=_norm_models(),
            lrs=[0.0005, 0.005, 0.01],
            seeds=[0, 1, 2],
            run=_with(STUDY_RUN, data={"val_size": 10000, "test_every_epoch": False}, train={"precision": "bf16"}),
        ),
        ExperimentPreset(
            name="sam",
            description="Chen et al. 2021 on MNIST: ViT and ViTBN at depth 6, Adam against Adam + SAM (rho 0.05), "
            "lr 0.0005, seed 0; 10000 training and 5000 test images, 15 epochs, fp32 (a 2-core CPU budget; "
            "sam-full is the full one), then `vitbn analyze` of each model.",
            models=_sam_models(),
            lrs=[0.0005],
            seeds=[0],
            run=_SAM_RUN,
        ),
        ExperimentPreset(
            name="sam-full",
            description="The sam experiment at full size (for a GPU): all 60000 training images, 30 epochs, bf16, "
            "lr 0.0005, seeds 0 and 1.",
            models=_sam_models(),
            lrs=[0.0005],
            seeds=[0, 1],
            run=_with(STUDY_RUN, train={"precision": "bf16"}),
        ),
        ExperimentPreset(
            name="augreg",
            description="Steiner et al. 2021 on MNIST subsets: ViT and ViTBN at depth 3, 1000 images (20 epochs) "
            "and 10000 (4 epochs), augmentation none / light / medium / heavy x regularization none / 0.1 (dropout "
            "and stochastic depth), AdamW (weight decay 0.05), lr 0.0005, the epoch chosen on a stratified 10% "
            "validation split, the whole test set at the end; fp32 (a 2-core CPU budget; augreg-full is the full one).",
            models=_augreg_models(3, {"1k": (1000, 20), "10k": (10000, 4)}),
            lrs=[0.0005],
            seeds=[0],
            run=_AUGREG_RUN,
        ),
        ExperimentPreset(
            name="augreg-full",
            description="The augreg experiment at full size (for a GPU): depth 6, 1000 / 10000 / 60000 images for "
            "100 / 30 / 15 epochs, seeds 0 and 1, bf16.",
            models=_augreg_models(6, {"1k": (1000, 100), "10k": (10000, 30), "60k": (60000, 15)}),
            lrs=[0.0005],
            seeds=[0, 1],
            run=_with(_AUGREG_RUN, train={"precision": "bf16"}),
        ),
        ExperimentPreset(
            name="transfer",
            description="Pre-training on MNIST (10000 images, 4 epochs, ViT and ViTBN at depth 3), then scikit-learn's "
            "8x8 digits (resized to 28x28) from scratch, from scratch + AugReg, and fine-tuned (everything, attention "
            "only, FFN only, head only), 15 epochs, the epoch chosen on a stratified 10% validation split; fp32 (a "
            "2-core CPU budget; transfer-full is the full one).",
            models=_models(("vit", 3), ("vitbn", 3)),
            lrs=[0.0005],
            seeds=[0],
            run=_with(
                STUDY_RUN,
                data={"train_subset": 10000, "val_fraction": 0.1, "test_every_epoch": False},
                train={"epochs": 4},
            ),  # fmt: skip
        ),
        ExperimentPreset(
            name="transfer-full",
            description="The transfer experiment at full size (for a GPU): depth 6, all 60000 MNIST images (10% for "
            "validation), 15 epochs, bf16; targets digits, Fashion-MNIST and KMNIST (5000 training images each), 30 "
            "epochs, seeds 0 and 1.",
            models=_models(("vit", 6), ("vitbn", 6)),
            lrs=[0.0005],
            seeds=[0, 1],
            run=_with(
                STUDY_RUN,
                data={"val_fraction": 0.1, "test_every_epoch": False},
                train={"epochs": 15, "precision": "bf16"},
            ),  # fmt: skip
        ),
        ExperimentPreset(
            name="best",
            description="The best MNIST model per norm: ViT and ViTBN as 3 stages of 2 parallel blocks (0.89M "
            "parameters), stochastic depth 0.1, AdamW (weight decay 0.05), label smoothing 0.1, lr 0.001 with a "
            "2-epoch warm-up and cosine decay, batch 128, translations up to 2 pixels and rotations up to 10 degrees, "
            "20 epochs on 54000 images, the epoch chosen on a stratified 10% validation split, the test set once for "
            "the chosen checkpoint; fp32 (a 2-core CPU budget; best-full is the full one).",
            models=BEST_MODELS,
            lrs=[0.001],
            seeds=[0],
            run=_BEST_RUN,
        ),
        ExperimentPreset(
            name="best-full",
            description="The best experiment at full size (for a GPU): 100 epochs (5 of warm-up), seeds 0 and 1, bf16.",
            models=BEST_MODELS,
            lrs=[0.001],
            seeds=[0, 1],
            run=_with(_BEST_RUN, train={"epochs": 100, "warmup_epochs": 5.0, "precision": "bf16"}),
        ),
        ExperimentPreset(
            name="cifar",
            description="CIFAR-10 on a 2-core CPU budget: ViT (LayerNorm) and ViTBN of the vit-cifar size (patch 4, "
            "dim 256, depth 7, 3.72M parameters), AdamW lr 0.001 (weight decay 0.05), 1 warm-up epoch then cosine, "
            "label smoothing 0.1, pad-4 crop and flip, batch 128, 4 epochs on the first 10000 training images (10% "
            "for validation, which chooses the epoch), 5000 test images at the end; fp32 (cifar-full is the full "
            "one).",
            models=_CIFAR_MODELS,
            lrs=[0.001],
            seeds=[0],
            run=_CIFAR_CPU_RUN,
        ),
        ExperimentPreset(
            name="cifar-full",
            description="The cifar experiment at full size (for a GPU): 300 epochs on all 50000 images (10% for "
            "validation), 10 warm-up epochs, lr 0.0005, RandAugment (2, 9), Mixup 0.8 / CutMix 1.0, stochastic "
            "depth 0.1, bf16; target >= 94% test accuracy with <= 4M parameters (CVT-7/4 at 300 epochs).",
            models=_CIFAR_MODELS,
            lrs=[0.0005],
            seeds=[0],
            run=_CIFAR_FULL_RUN,
        ),
        ExperimentPreset(
            name="norms-cifar",
            description="The norms experiment on CIFAR-10 (2-core CPU budget): LayerNorm, RMSNorm, DyT, ViTBNFFN, "
            "ViTBN and PRepBN on a depth-4 ViT (dim 128, patch 4), AdamW at 3 learning rates, 2 seeds, the lr "
            "selected on a stratified 20% validation split of the first 10000 training images, 4 epochs, pad-4 crop "
            "and flip, 5000 test images at the end; fp32 (norms-cifar-full is the full one).",
            models=_norm_models(4),
            lrs=[0.0005, 0.001, 0.002],
            seeds=[0, 1],
            run=_NORMS_CIFAR_RUN,
        ),
        ExperimentPreset(
            name="norms-cifar-full",
            description="The norms experiment on CIFAR-10 at full size (for a GPU): the six norms on the vit-cifar "
            "size (dim 256, depth 7), 200 epochs on all 50000 images (10% for validation, which selects the lr), "
            "10 warm-up epochs, RandAugment (2, 9) with Mixup 0.2, bf16, 3 learning rates, 2 seeds.",
            models=_norm_models(7),
            lrs=[0.0005, 0.001, 0.002],
            seeds=[0, 1],
            run=_NORMS_CIFAR_FULL_RUN,
        ),
        ExperimentPreset(
            name="study-tune",
            description="The article's experiment 2: Bayesian optimization of lr and batch size (20 trials, 3 "
            "epochs each, validation split of 10000), then 30 epochs of each tuned model.",
            models=_STUDY_MODELS,
            seeds=[0],
            final_epochs=30,
            run=_with(STUDY_RUN, data={"val_size": 10000}, hpo={"trials": 20, "sobol_trials": 5, "epochs": 3}),
        ),
        ExperimentPreset(
            name="quick-tune",
            description="A short tuning: depth-1 models, 5000 training images (2000 of them for validation), 8 "
            "trials of 1 epoch, then 3 epochs.",
            models=_models(("vit", 1), ("vitbnffn", 1), ("vitbn", 1)),
            seeds=[0],
            final_epochs=3,
            run=_with(_QUICK_RUN, data={"val_size": 2000}, hpo={"trials": 8, "sobol_trials": 4, "epochs": 1}),
        ),
    )
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def load_preset(name_or_path: str | Path) -> ExperimentPreset:
    """A preset by name (``"study"``) or from a YAML file (``configs/fair.yaml``)."""
    key = str(name_or_path)
    if key in PRESETS:
        return copy.deepcopy(PRESETS[key])
    path = Path(key)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            return ExperimentPreset.from_dict(load_yaml(path))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    raise UserError(f"preset {key!r} is not one of {', '.join(list_presets())} nor a YAML file")


def write_preset_yaml(preset: ExperimentPreset, path: str | Path) -> None:
    save_yaml(preset.to_dict(), path)


def override_preset(
    preset: ExperimentPreset,
    *,
    lrs: list[float] | None = None,
    models: list[str] | None = None,
    seeds: list[int] | None = None,
    epochs: int | None = None,
    run: dict[str, dict[str, Any]] | None = None,
) -> ExperimentPreset:
    """A copy with CLI overrides. ``lrs`` must be a subset of the preset's (the sweep is defined by it); ``models``
    selects by name (every depth) or label (``vitbn-d1``); ``run`` updates the shared sections."""
    out = copy.deepcopy(preset)
    if lrs:
        extra = [lr for lr in lrs if not any(abs(lr - p) <= 1e-12 * p for p in preset.lrs)]
        if extra:
            raise UserError(f"--lr {extra} not in preset {preset.name!r} lrs {preset.lrs} (use a YAML preset)")
        out.lrs = [float(lr) for lr in lrs]
    if models:
        known = {m.name for m in preset.models} | {m.label for m in preset.models}
        bad = sorted(set(models) - known)
        if bad:
            raise UserError(f"--models {bad} not in preset {preset.name!r}: {', '.join(sorted(known))}")
        out.models = [m for m in preset.models if m.name in models or m.label in models]
    if seeds:
        out.seeds = list(seeds)
    sections = copy.deepcopy(run or {})
    if epochs is not None:
        sections.setdefault("train", {})["epochs"] = epochs
    for key, value in sections.items():
        out.run[key] = {**out.run.get(key, {}), **value}
    return ExperimentPreset.from_dict(out.to_dict())


def describe_overrides(preset: ExperimentPreset, reference: ExperimentPreset) -> str:
    """``"epochs=1, train_subset=500"``: the shared settings that differ from the named preset (for run names)."""
    a, b = to_dict(preset.base_config(preset.models[0])), to_dict(reference.base_config(preset.models[0]))
    diffs = []
    for section in ("data", "train", "hpo"):
        for key, value in a[section].items():
            if b[section].get(key) != value and key not in ("lr", "seed", "out_dir", "trials"):
                diffs.append(f"{key}={value}")
    return ", ".join(diffs)
