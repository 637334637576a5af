"""Configuration dataclasses: one per concern, grouped in ``RunConfig``.

Every config is a plain dataclass that validates itself in ``__post_init__`` and round-trips through
``to_dict`` / ``from_dict`` (and YAML), so that the whole configuration can be logged as flat MLflow params
(``flatten``) and saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

NORMS = ("layer", "rms", "batch", "repbn", "prepbn", "dyt", "none")
BN_NORMS = ("batch", "repbn", "prepbn")  # the kinds that hold a BatchNorm (running statistics, folding)
NORM_SLOTS = ("embed_norm", "attn_norm", "ffn_norm", "ffn_inner_norm", "final_norm")
STEMS = ("linear", "hmlp", "conv")
POOLS = ("cls", "mean")
POS_EMBS = ("learn", "pe1d", "pe2d")
BN_STATS = ("feature", "scalar")
ATTN_IMPLS = ("auto", "fused", "plain")
ATTN_ALIASES = {"sdpa": "fused", "explicit": "plain"}  # the names of earlier versions, in saved configs
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and "cuda:N", the GPU of index N (see check_device)
PRECISIONS = ("fp32", "bf16", "fp16")
RANDAUG_MAX_MAGNITUDE = 30  # torchvision's scale: magnitude 30 is each op's largest change

# The augmentation levels (AugmentConfig.from_level), AugReg's light / medium / heavy: RandAugment(2, 10 / 15 / 20)
# with Mixup 0 / 0.2 / 0.5. The plain levels are for digits and characters: no flips (a flip changes what a glyph
# is) and translations of 2 pixels (a 28x28 digit's 20x20 glyph leaves a 4-pixel margin). The natural-* levels are
# for natural images (CIFAR): the usual pad-4 random crop and horizontal flip.
#     level            crop_padding  hflip  RandAugment (ops, magnitude)  mixup_alpha  cutmix_alpha
#     none             0             no     off                           0            0
#     light            2             no     off                           0            0
#     medium           2             no     2, 9                          0.2          0
#     heavy            2             no     2, 15                         0.5          0
#     natural-light    4             yes    off                           0            0
#     natural-medium   4             yes    2, 9                          0.2          0
#     natural-heavy    4             yes    2, 15                         0.8          1.0
_AUG_OFF: dict[str, Any] = dict(
    crop_padding=0, hflip=False, rotate=0.0, randaug_ops=0, randaug_magnitude=9, mixup_alpha=0.0, cutmix_alpha=0.0,
    mix_prob=1.0,
)  # fmt: skip
_NATURAL: dict[str, Any] = {**_AUG_OFF, "crop_padding": 4, "hflip": True}
AUGMENT_LEVEL_SETTINGS: dict[str, dict[str, Any]] = {
    "none": dict(_AUG_OFF),
    "light": {**_AUG_OFF, "crop_padding": 2},
    "medium": {**_AUG_OFF, "crop_padding": 2, "randaug_ops": 2, "randaug_magnitude": 9, "mixup_alpha": 0.2},
    "heavy": {**_AUG_OFF, "crop_padding": 2, "randaug_ops": 2, "randaug_magnitude": 15, "mixup_alpha": 0.5},
    "natural-light": dict(_NATURAL),
    "natural-medium": {**_NATURAL, "randaug_ops": 2, "randaug_magnitude": 9, "mixup_alpha": 0.2},
    "natural-heavy": {**_NATURAL, "randaug_ops": 2, "randaug_magnitude": 15, "mixup_alpha": 0.8, "cutmix_alpha": 1.0},
}
AUGMENT_LEVELS = tuple(AUGMENT_LEVEL_SETTINGS)

# Datasets of digits and characters, where a horizontal flip changes the class (a mirrored 2 is no digit): hflip is
# refused on them. SVHN is photographs, but of digits.
GLYPH_DATASETS = ("mnist", "kmnist", "digits", "svhn", "svhn-extra", "emnist-balanced", "emnist-byclass",
                  "emnist-letters", "emnist-digits", "emnist-mnist")  # fmt: skip

# The model input on registered datasets whose images are not MNIST's 1x28x28 in 10 classes. A run on one of them
# takes these settings unless its model section sets them (so ``--dataset cifar10 --model vitbn`` builds a 32x32 RGB
# model in 4x4 patches, 64 tokens); vitbn.data registers each dataset with this shape and class count.
_RGB32: dict[str, Any] = dict(channels=3, image_size=32, patch_size=4)
DATASET_INPUTS: dict[str, dict[str, Any]] = {
    "cifar10": {**_RGB32, "num_classes": 10},
    "cifar100": {**_RGB32, "num_classes": 100},
    "cifar100-coarse": {**_RGB32, "num_classes": 20},
    "svhn": {**_RGB32, "num_classes": 10},
    "svhn-extra": {**_RGB32, "num_classes": 10},
    "emnist-balanced": {"num_classes": 47},
    "emnist-byclass": {"num_classes": 62},
    "emnist-letters": {"num_classes": 26},
    "emnist-digits": {"num_classes": 10},
    "emnist-mnist": {"num_classes": 10},
}


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field_name}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def check_device(value: Any, field_name: str = "device") -> str:
    """``value`` if it names a device a run can ask for: one of ``DEVICES`` or ``cuda:N`` (N a GPU index; whether
    that GPU exists is checked when the run starts); else a ValueError naming the allowed forms."""
    kind, colon, index = str(value).partition(":")
    if value in DEVICES or (kind == "cuda" and colon and index.isdigit()):
        return value
    raise ValueError(f"{field_name}={value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N' (a GPU index), 'mps'")


def _positive(field_name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field_name}={value!r} must be a positive integer")


def _non_negative(field_name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{field_name}={value!r} must be >= 0")


# The study's MNIST hyperparameters (vit-pytorch keywords), shared by the three presets.
STUDY_MNIST: dict[str, Any] = dict(
    image_size=28, patch_size=7, channels=1, num_classes=10, dim=64, depth=6, heads=8, dim_head=64, mlp_dim=128,
    dropout=0.0, emb_dropout=0.0, pool="cls", pos_emb="learn",
)  # fmt: skip

# Norm placement of each variant (see the study): ViTBNFFN keeps LayerNorm before attention and puts a
# BatchNorm inside the FFN instead of in front of it; ViTBN replaces every LayerNorm by token BatchNorm.
VARIANT_NORMS: dict[str, dict[str, str]] = {
    "vit": dict(embed_norm="layer", attn_norm="layer", ffn_norm="layer", ffn_inner_norm="none", final_norm="layer"),
    "vitbnffn": dict(
        embed_norm="layer", attn_norm="layer", ffn_norm="none", ffn_inner_norm="batch", final_norm="layer"
    ),
    "vitbn": dict(embed_norm="batch", attn_norm="batch", ffn_norm="none", ffn_inner_norm="batch", final_norm="batch"),
}

# The small ViT for 32x32 RGB images (CIFAR, SVHN), in the class of Compact Transformers' ViT-Lite-7/4 (Hassani et
# al. 2021): patch 4 (64 tokens and a CLS token), dim 256, depth 7, 4 heads of 64, MLP ratio 2 (mlp_dim 512). Patch 4
# is what every from-scratch CIFAR ViT recipe uses (patch 8 leaves 16 tokens and loses accuracy); MLP ratio 2 rather
# than 4 keeps the model under 4M parameters at depth 7: 3.72M with LayerNorm (tests/test_models_cifar.py counts it).
VIT_CIFAR: dict[str, Any] = dict(
    image_size=32, patch_size=4, channels=3, num_classes=10, dim=256, depth=7, heads=4, dim_head=64, mlp_dim=512,
    dropout=0.0, emb_dropout=0.0, pool="cls", pos_emb="learn",
)  # fmt: skip

# Preset name -> ModelConfig defaults. ``vitbn.models.register_model`` adds to it.
MODEL_PRESETS: dict[str, dict[str, Any]] = {name: {**STUDY_MNIST, **norms} for name, norms in VARIANT_NORMS.items()}
MODEL_PRESETS.update({f"{name}-cifar": {**VIT_CIFAR, **norms} for name, norms in VARIANT_NORMS.items()})


def apply_norm(norms: dict[str, str], kind: str) -> dict[str, str]:
    """``--norm KIND``: every slot of ``norms`` that holds a norm gets ``kind``; empty slots stay empty (so the ViT's
    feed-forward block keeps its single pre-norm, and ViTBN's its single inner norm)."""
    _choice("norm", kind, NORMS)
    return {slot: current if current == "none" else kind for slot, current in norms.items()}


def resolve_norms(own: dict[str, str], *layers: dict[str, Any]) -> dict[str, str]:
    """The norm slots after each layer of settings in turn (a name's changes, then overrides): a layer's ``norm``
    (see ``apply_norm``) first, then its per-slot settings, which win."""
    norms = dict(own)
    for layer in layers:
        if "norm" in layer:
            norms = apply_norm(norms, layer["norm"])
        norms.update({slot: layer[slot] for slot in NORM_SLOTS if slot in layer})
    return norms


def model_name(base: str, norms: dict[str, str]) -> str:
    """The name that describes a model built from preset ``base`` with the norm placement ``norms``.

    The preset's own name when the norms are the preset's; the study variant whose placement they are (a ``vit``
    preset with every norm of ViTBN is ``vitbn``); else the preset and the slots that differ, e.g.
    ``vit+attn_norm=batch``; a preset whose every norm is one kind is ``vit+norm=dyt``. So a run never logs a
    model holding BatchNorm as plain ``vit``.
    """
    preset = MODEL_PRESETS.get(base)
    if preset is None:
        return base
    own = {slot: preset.get(slot, getattr(ModelConfig, slot)) for slot in NORM_SLOTS}
    if norms == own:
        return base
    for variant, placement in VARIANT_NORMS.items():
        if norms == placement:
            return variant
    for kind in NORMS:
        if norms == apply_norm(own, kind):
            return f"{base}+norm={kind}"
    return base + "".join(f"+{slot}={kind}" for slot, kind in norms.items() if kind != own[slot])


def hmlp_factors(patch: int) -> tuple[int, ...]:
    """The kernel sizes of the hMLP stem's stages for a square patch: up to two trailing 2x2 merges after a
    first stage that takes the rest (the paper's 16 = 4x2x2; 4 = 2x2, 8 = 2x2x2, 14 = 7x2), else the smallest
    split (9 = 3x3). A patch with no split (a prime) raises a ValueError that suggests one."""
    rest, twos = patch, 0
    while twos < 2 and rest % 2 == 0 and rest > 2:
        rest, twos = rest // 2, twos + 1
    if twos:
        return (rest, *(2,) * twos)
    for small in range(2, int(patch**0.5) + 1):
        if patch % small == 0:
            return (patch // small, small)
    raise ValueError(
        f"stem='hmlp' splits the patch into stages (4 = 2x2, 14 = 7x2, 16 = 4x2x2) but patch_size={patch} has "
        "no factors: use patch_size 4 (49 tokens on 28x28 images) or 14"
    )


def pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Returns ``(h, w)`` from an int or a 2-sequence."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair (h, w), got {value!r}")
        return int(value[0]), int(value[1])
    return value, value


@dataclass
class ModelConfig:
    """A VisionTransformer. Defaults are the study's MNIST ViT (vit-pytorch keywords)."""

    name: str = "custom"  # preset it came from; informational
    image_size: int | tuple[int, int] = 28
    patch_size: int | tuple[int, int] = 7
    channels: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 128
    pool: str = "cls"  # "cls": classify the CLS token; "mean": average the tokens
    class_token: bool | None = None  # None: a CLS token iff pool == "cls" (vit-pytorch's current layout)
    pos_emb: str = "learn"  # "learn" | "pe1d" (1-D sincos) | "pe2d" (2-D sincos)
    dropout: float = 0.0
    emb_dropout: float = 0.0
    # One norm per position, each a kind of NORMS: "layer" | "rms" | "batch" | "repbn" | "prepbn" | "dyt" | "none".
    embed_norm: str = "layer"  # both norms of the patch embedding (on patch pixels, then on tokens)
    attn_norm: str = "layer"  # pre-norm of every attention sub-block
    ffn_norm: str = "layer"  # pre-norm of every feed-forward sub-block
    ffn_inner_norm: str = "none"  # between fc1 and GELU
    final_norm: str = "layer"  # after the last block
    bn_stats: str = "feature"  # "feature": per-feature BN stats; "scalar": the original code's BatchNorm2d(1)
    bn_momentum: float = 0.1
    ghost_batch_size: int | None = None  # BN statistics over sub-batches of this many images (ghost BN)
    dyt_alpha: float = 0.5  # DyT's initial alpha (the paper's for ViTs)
    attn_impl: str = "auto"  # "fused" kernel, "plain" batched products + softmax, "auto": measured at first use
    # Recipes of Touvron et al. 2022 ("Three things everyone should know about ViTs") and CaiT/DeiT III.
    parallel: int = 1  # branches per stage: x = x + sum_i MHSA_i(x); x = x + sum_i FFN_i(x); depth counts stages
    layer_scale: float | None = None  # LayerScale init value (per-channel scale on every residual branch); None: off
    drop_path: float = 0.0  # stochastic depth: max rate, rising linearly over the stages (0 at the first)
    stem: str = "linear"  # "linear" patch embedding | "hmlp" hierarchical MLP (patches stay independent) | "conv"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)
        (ih, iw), (ph, pw) = pair(self.image_size), pair(self.patch_size)
        for name, value in (("image_size", ih), ("image_size", iw), ("patch_size", ph), ("patch_size", pw)):
            _positive(name, value)
        if ih % ph or iw % pw:
            raise ValueError(
                f"patch_size={self.patch_size!r} must divide image_size={self.image_size!r} in both dimensions"
            )
        for name in ("channels", "num_classes", "dim", "depth", "heads", "dim_head", "mlp_dim"):
            _positive(name, getattr(self, name))
        _choice("pool", self.pool, POOLS)
        _choice("pos_emb", self.pos_emb, POS_EMBS)
        for name in ("embed_norm", "attn_norm", "ffn_norm", "ffn_inner_norm", "final_norm"):
            _choice(name, getattr(self, name), NORMS)
        if self.pos_emb == "pe2d" and self.dim % 4:
            raise ValueError(f"pos_emb='pe2d' needs dim divisible by 4, got dim={self.dim}")
        if self.pos_emb == "pe1d" and self.dim % 2:
            raise ValueError(f"pos_emb='pe1d' needs an even dim, got dim={self.dim}")
        _choice("bn_stats", self.bn_stats, BN_STATS)
        self.attn_impl = ATTN_ALIASES.get(self.attn_impl, self.attn_impl)
        _choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        for name in ("dropout", "emb_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1)")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum={self.bn_momentum!r} must be in [0, 1]")
        if self.ghost_batch_size is not None:
            _positive("ghost_batch_size", self.ghost_batch_size)
        if not self.dyt_alpha > 0:
            raise ValueError(f"dyt_alpha={self.dyt_alpha!r} must be > 0")
        self._check_recipes(ph, pw)
        self.name = model_name(self.name.split("+")[0], {slot: getattr(self, slot) for slot in NORM_SLOTS})

    def _check_recipes(self, ph: int, pw: int) -> None:
        _positive("parallel", self.parallel)
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise ValueError(f"layer_scale={self.layer_scale!r} must be > 0 or null (off)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path!r} must be in [0, 1)")
        _choice("stem", self.stem, STEMS)
        if self.stem != "linear" and ph != pw:
            raise ValueError(f"stem={self.stem!r} needs a square patch, got patch_size={self.patch_size!r}")
        if self.stem == "hmlp":
            hmlp_factors(ph)
        if self.stem == "conv" and ph % 2:
            raise ValueError(
                f"stem='conv' halves the image with stride-2 convolutions: patch_size={ph} must be even (e.g. 4)"
            )

    @property
    def has_class_token(self) -> bool:
        return self.pool == "cls" if self.class_token is None else bool(self.class_token)

    @property
    def num_patches(self) -> int:
        (ih, iw), (ph, pw) = pair(self.image_size), pair(self.patch_size)
        return (ih // ph) * (iw // pw)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.has_class_token)

    @property
    def uses_batchnorm(self) -> bool:
        """Whether a norm holds a BatchNorm (``batch``, ``repbn`` or ``prepbn``)."""
        return any(getattr(self, slot) in BN_NORMS for slot in NORM_SLOTS)

    @property
    def uses_prepbn(self) -> bool:
        return "prepbn" in (getattr(self, slot) for slot in NORM_SLOTS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset's defaults with fields overridden, e.g. ``ModelConfig.from_preset("vitbn", depth=1)``; the
        name describes the result (see ``model_name``). ``norm=KIND`` (in the overrides or the name) puts KIND in
        every slot that holds a norm (``apply_norm``); per-slot settings win over it."""
        base, *changes = name.split("+")
        named = dict(change.partition("=")[::2] for change in changes)  # "vit+attn_norm=batch": the name it logs
        if base not in MODEL_PRESETS or not set(named) <= {*NORM_SLOTS, "norm"}:
            raise ValueError(f"model={name!r} is not one of {', '.join(repr(n) for n in sorted(MODEL_PRESETS))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields - {"norm"})
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; allowed: norm, {', '.join(sorted(fields))}")
        preset = MODEL_PRESETS[base]
        own = {slot: preset.get(slot, getattr(cls, slot)) for slot in NORM_SLOTS}
        norms = resolve_norms(own, named, overrides)
        rest = {k: v for k, v in overrides.items() if k != "norm"}
        return cls(**{**preset, **rest, **norms, "name": base})


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    dataset: str = "mnist"  # a registered name (mnist, cifar10, svhn, emnist-letters, ...), "npz:PATH", "folder:PATH"
    root: str | None = None  # None: $VITBN_DATA, else ~/.cache/vitbn
    download: bool = True
    val_size: int = 0  # images carved (seeded) from the training set for validation; 0: none
    val_fraction: float | None = None  # instead of val_size: this fraction of each class (stratified, seeded)
    split_seed: int = 0
    test_every_epoch: bool = True  # the study's practice; False: the test set is evaluated once, at the end
    train_subset: int | None = None  # keep the first N training images (quick runs, tests)
    test_subset: int | None = None  # keep the first N test images

    def __post_init__(self) -> None:
        _non_negative("val_size", self.val_size)
        if self.val_fraction is not None:
            if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction <= 0.5):
                raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 0.5]")
            if self.val_size:
                raise ValueError(
                    f"val_size={self.val_size} and val_fraction={self.val_fraction} both set: give one of them"
                )
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))


@dataclass
class TrainConfig:
    """The optimization and the machinery around it."""

    epochs: int = 30
    batch_size: int = 100
    eval_batch_size: int = 5000
    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # the study's; "cosine" decays to 0 after a linear warm-up
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm
    max_steps_per_epoch: int | None = None  # cap on batches per epoch (smoke runs, tests)
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    # TF32 for fp32 matrix products and cuDNN convolutions alike (Ampere and later GPUs; no effect elsewhere).
    # Off: fp32 means fp32 on every GPU (PyTorch's own default leaves matmuls in fp32 but convolutions in TF32).
    tf32: bool = False
    threads: int | None = None  # torch.set_num_threads; None leaves PyTorch's choice
    seed: int = 0
    out_dir: str = "runs"  # checkpoints and exported models go to out_dir/<run name>
    resume: bool = False
    precise_bn: bool = False  # recompute BN population statistics before every evaluation
    precise_bn_batches: int = 50
    sync_bn: bool = False  # distributed runs: SyncBatchNorm across ranks
    # PRepBN's lambda (1: LayerNorm, 0: RepBN) by optimizer step: LayerNorm-only warm-up, then a linear ramp.
    prepbn_warmup_steps: int | None = None  # None: a tenth of the run's steps
    prepbn_decay_steps: int | None = None  # None: to the last step, so training ends at lambda = 0
    # Sharpness-aware minimization around the optimizer: radius rho (None: off; 0.05 is SAM's usual value).
    sam_rho: float | None = None
    sam_adaptive: bool = False  # ASAM: the perturbation scaled element-wise by |w| (needs sam_rho)
    # Model selection on the validation split: best.pt keeps the epoch of highest val accuracy beside the last.
    early_stopping: int | None = None  # stop after this many epochs without a better val accuracy; None: off

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        for name in ("epochs", "batch_size", "eval_batch_size", "precise_bn_batches"):
            _positive(name, getattr(self, name))
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        check_device(self.device)
        if not isinstance(self.tf32, bool):
            raise ValueError(f"tf32={self.tf32!r} must be true or false")
        _choice("precision", self.precision, PRECISIONS)
        if not (math.isfinite(self.lr) and self.lr > 0):  # inf would train until the loss diverges
            raise ValueError(f"lr={self.lr!r} must be a finite number > 0")
        for name in ("weight_decay", "warmup_epochs", "label_smoothing"):
            _non_negative(name, getattr(self, name))
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be > 0 or null")
        for name in ("max_steps_per_epoch", "threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("prepbn_warmup_steps", "prepbn_decay_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}={value!r} must be an integer >= 0 or null (the default)")
        if self.sam_rho is not None and not (isinstance(self.sam_rho, (int, float)) and self.sam_rho > 0):
            raise ValueError(f"sam_rho={self.sam_rho!r} must be > 0, or null for no SAM")
        if self.sam_adaptive and self.sam_rho is None:
            raise ValueError("sam_adaptive=True (ASAM) needs sam_rho, the radius of the perturbation")
        if self.early_stopping is not None:
            _positive("early_stopping", self.early_stopping)


@dataclass
class AugmentConfig:
    """Training-time augmentation of batched tensors on the training device (Steiner et al. 2021, AugReg).

    Off by default (the study trains without augmentation). ``AugmentConfig.from_level`` gives the named levels
    (``AUGMENT_LEVEL_SETTINGS``). Flips are for natural images only: a run on a dataset of ``GLYPH_DATASETS`` refuses
    them (they change what a digit or a character is).
    """

    level: str = "none"  # the named level these settings came from, or "custom"; informational
    crop_padding: int = 0  # random translation by up to this many pixels, zero fill (pad-and-crop)
    hflip: bool = False  # mirror each image left-right with probability 0.5 (natural images only)
    rotate: float = 0.0  # random rotation in [-rotate, rotate] degrees
    randaug_ops: int = 0  # RandAugment: ops applied per image (0: off)
    randaug_magnitude: int = 9  # RandAugment magnitude, 0..30
    mixup_alpha: float = 0.0  # Mixup's Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed (when Mixup or CutMix is on)
    seed: int = 0  # the augmentation's random stream, with the epoch (reproducible after a resume)

    def __post_init__(self) -> None:
        _choice("level", self.level, (*AUGMENT_LEVELS, "custom"))
        if not isinstance(self.crop_padding, int) or isinstance(self.crop_padding, bool) or self.crop_padding < 0:
            raise ValueError(f"crop_padding={self.crop_padding!r} must be an integer >= 0")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"hflip={self.hflip!r} must be true or false")
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"rotate={self.rotate!r} must be in [0, 180] degrees")
        if not isinstance(self.randaug_ops, int) or self.randaug_ops < 0:
            raise ValueError(f"randaug_ops={self.randaug_ops!r} must be an integer >= 0")
        if not 0 <= self.randaug_magnitude <= RANDAUG_MAX_MAGNITUDE:
            raise ValueError(f"randaug_magnitude={self.randaug_magnitude!r} must be in [0, {RANDAUG_MAX_MAGNITUDE}]")
        for name in ("mixup_alpha", "cutmix_alpha"):
            _non_negative(name, getattr(self, name))
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError(f"mix_prob={self.mix_prob!r} must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        return bool(
            self.crop_padding or self.hflip or self.rotate or self.randaug_ops or self.mixup_alpha or self.cutmix_alpha
        )

    @property
    def mixes(self) -> bool:
        """Whether targets become soft (Mixup or CutMix)."""
        return bool((self.mixup_alpha or self.cutmix_alpha) and self.mix_prob > 0)

    @classmethod
    def from_level(cls, level: str, **overrides: Any) -> AugmentConfig:
        """A named level of ``AUGMENT_LEVEL_SETTINGS`` (``none``, ``light``, ..., ``natural-heavy``) with fields
        overridden."""
        _choice("augment level", level, AUGMENT_LEVELS)
        settings = AUGMENT_LEVEL_SETTINGS[level]
        made = cls(**{**settings, **overrides, "level": "custom"})
        plain = cls(**{**settings, "seed": made.seed, "level": "custom"})
        return dataclasses.replace(made, level=level) if made == plain else made


@dataclass
class TrackConfig:
    """MLflow tracking."""

    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
    experiment: str = "vitbn"
    run_name: str | None = None


@dataclass
class HPOConfig:
    """Bayesian optimization (Ax) of the learning rate and the batch size."""

    trials: int = 20
    sobol_trials: int = 5  # quasi-random trials before BoTorch takes over
    epochs: int = 3  # epochs per trial
    objective_epochs: int = 3  # the objective: mean validation accuracy of a trial's last N epochs
    lr_min: float | None = None  # None: the study's range for the model (ViT [1e-5, 1e-3], BN [1e-5, 1e-2])
    lr_max: float | None = None
    batch_min: int = 20
    batch_max: int = 120
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("trials", "epochs", "objective_epochs", "batch_min", "batch_max"):
            _positive(name, getattr(self, name))
        _non_negative("sobol_trials", self.sobol_trials)
        if self.batch_min > self.batch_max:
            raise ValueError(f"batch_min={self.batch_min} must be <= batch_max={self.batch_max}")


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.augment.hflip and self.data.dataset in GLYPH_DATASETS:
            raise ValueError(
                f"hflip on dataset {self.data.dataset!r} (digits or characters): a flip changes what a glyph is; "
                "flips are for natural images (cifar10, cifar100, npz:/folder: photos)"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Builds a RunConfig; ``model.name`` naming a preset starts from that preset."""
        data = dict(data or {})
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            sections = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; allowed: {sections}")
        model = dict(data.get("model") or {})
        dataset = (data.get("data") or {}).get("dataset", DataConfig.dataset)
        model = {**DATASET_INPUTS.get(dataset, {}), **model}  # the dataset's input where the model leaves it unset
        name = model.pop("name", None)
        if name not in (None, "custom"):
            model_config = ModelConfig.from_preset(name, **model)
        else:
            if "norm" in model:  # norm=KIND over the default (ViT) placement, per-slot settings winning
                own = {slot: getattr(ModelConfig, slot) for slot in NORM_SLOTS}
                model = {**model, **resolve_norms(own, model)}
                del model["norm"]
            model_config = from_dict(ModelConfig, model)
        return cls(
            model=model_config,
            data=from_dict(DataConfig, data.get("data") or {}),
            train=from_dict(TrainConfig, data.get("train") or {}),
            track=from_dict(TrackConfig, data.get("track") or {}),
            hpo=from_dict(HPOConfig, data.get("hpo") or {}),
            augment=_augment_from_dict(data.get("augment") or {}),
        )


def _augment_from_dict(data: dict[str, Any]) -> AugmentConfig:
    """``augment:`` of a config: a named ``level`` (default none) with the given fields over its settings."""
    data = dict(data)
    level = data.pop("level", "none")
    if level == "none" and not data:
        return AugmentConfig()
    if level == "custom":
        return from_dict(AugmentConfig, data)
    names = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown AugmentConfig field(s) {unknown}; allowed: {', '.join(sorted(names))}")
    return AugmentConfig.from_level(level, **data)


T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as nested plain dicts, tuples as lists (YAML-safe)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else plain(value)
    return out


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Builds a flat config dataclass, rejecting unknown keys with the list of allowed ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {', '.join(names)}")
    return cls(**data)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
