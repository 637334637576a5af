"""A trained model carried to another dataset: new head, position table resampled to another patch grid, patch
embedding adapted to another number of channels; and the images of a dataset resized once to a new size.

These are the weight surgeries of transfer learning (Steiner et al. 2021, "How to train your ViT"; Touvron et al.
2022, "Three things everyone should know about ViTs"); ``vitbn.engine.finetune`` puts them together.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vitbn.config import pair
from vitbn.engine.checkpoint import unwrap
from vitbn.errors import UserError

# Images per interpolation call when resizing a split: bounds the float copy to ~chunk * C * H * W * 4 bytes.
_RESIZE_CHUNK = 2048
_PATCH_NORM = "to_patch_embedding.norm_in."
_PATCH_WEIGHT = "to_patch_embedding.proj.weight"


def resample_pos_embedding(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], has_cls: bool
) -> torch.Tensor:
    """A learned position table moved to another patch grid: the patch rows, seen as a (D, h, w) image, are
    interpolated bicubically (``align_corners=False``, antialiased when the grid shrinks, as timm's
    ``resample_abs_pos_embed``) to the new grid; the CLS row, which has no position, is kept as it is.

    Args:
        pos: (has_cls + h*w, D), patches row-major.
        old_grid: (h, w) of ``pos``.
        new_grid: (h', w') wanted.
        has_cls: whether row 0 is the CLS token's.

    Returns:
        (has_cls + h'*w', D); a copy of ``pos`` when the grids are equal.
    """
    (h, w), (nh, nw) = tuple(old_grid), tuple(new_grid)
    cls, patches = pos[: int(has_cls)], pos[int(has_cls) :]
    if patches.shape[0] != h * w:
        raise ValueError(f"pos has {patches.shape[0]} patch rows, not the {h}x{w} of old_grid")
    if (h, w) == (nh, nw):
        return pos.clone()
    d = pos.shape[1]
    grid = patches.reshape(1, h, w, d).permute(0, 3, 1, 2).float()  # (h*w, D) -> (1, D, h, w)
    shrinks = nh < h or nw < w
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False, antialias=shrinks)
    patches = grid.permute(0, 2, 3, 1).reshape(nh * nw, d).to(pos.dtype)  # (1, D, h', w') -> (h'*w', D)
    return torch.cat([cls, patches])


def adapt_channels(weight: torch.Tensor, pixels: int, channels: int, *, sums: bool) -> torch.Tensor:
    """A tensor over patch pixels ordered ``(p1 p2 c)`` (its dim 0, or dim 1 of a projection weight when
    ``sums``) carried from its channel count to ``channels``.

    The rule is timm's ``adapt_input_conv``: to one channel, the projection weights are summed over the
    channels; to C channels, the old channels are repeated cyclically and the projection weights scaled by
    ``C_old / C``, so that a gray image repeated in 3 channels gives the 1-channel model's tokens exactly. A
    per-pixel norm's tensors (``sums`` False: affine, running statistics) are averaged to one channel and
    repeated to more, which keeps that equality through the norm.

    Args:
        weight: (pixels * C_old, ...) for a norm's tensor, (D, pixels * C_old) for the projection.
        pixels: p1 * p2.
        channels: C, the new channel count.
        sums: the projection weight (summed / scaled) rather than a norm's tensor (averaged / repeated).
    """
    t = weight.t() if sums else weight  # (pixels * C_old, ...)
    old = t.shape[0] // pixels
    t = t.reshape(pixels, old, *t.shape[1:])  # (pixels, C_old, ...)
    if channels == 1:
        t = t.sum(1, keepdim=True) if sums else t.mean(1, keepdim=True)
    else:
        t = t[:, torch.arange(channels) % old]
        t = t * old / channels if sums else t
    t = t.reshape(pixels * channels, *t.shape[2:])
    return t.t().contiguous() if sums else t.contiguous()


def check_adaptable(config, image_size: tuple[int, int], channels: int) -> None:
    """One-line UserErrors for what ``adapt_model`` cannot carry: a patch size that does not divide the new
    image size, or another channel count for a stem other than the linear patch embedding."""
    (ih, iw), (ph, pw) = image_size, pair(config.patch_size)
    if ih % ph or iw % pw:
        sizes = sorted({-(-max(ih, iw) // ph) * ph, pair(config.image_size)[0]})
        raise UserError(
            f"patch size {ph}x{pw} of model {config.name!r} does not divide the image size {ih}x{iw}: resize the "
            f"images to a multiple of it (--image-size {' or '.join(str(s) for s in sizes)})"
        )
    if channels != config.channels and config.stem != "linear":
        raise UserError(
            f"stem={config.stem!r} of model {config.name!r} takes {config.channels}-channel images, the data has "
            f"{channels}: only the linear patch embedding can be adapted to another channel count"
        )


def adapt_model(
    model: nn.Module,
    *,
    num_classes: int,
    image_size: int | tuple[int, int],
    channels: int,
    new_head: bool | None = None,
) -> tuple[nn.Module, list[str]]:
    """A VisionTransformer of ``model``'s architecture for other images and classes, with ``model``'s weights.

    The new model is built from ``dataclasses.replace(model.config, num_classes, image_size, channels)``; every
    tensor of the same shape is copied; and:

    - the head ``mlp_head`` is new (zero-initialized, big_vision's fine-tuning default: the model starts at
      uniform predictions, not at a random map of its features) when ``new_head``, by default when the number
      of classes differs;
    - a learned ``pos_embedding`` is resampled (``resample_pos_embedding``) when the patch grid changes; a
      sincos table is rebuilt by the model itself;
    - another channel count adapts the linear patch embedding (``adapt_channels``); the hMLP and conv stems
      are refused.

    Args:
        model: the trained VisionTransformer (possibly wrapped); left unchanged.
        num_classes: classes of the new data.
        image_size: (H, W) or a side of the new images; the patch size must divide it.
        channels: channels of the new images.
        new_head: a new head; None: when ``num_classes`` differs from the model's.

    Returns:
        The new model (on the CPU, in training mode) and one note per change made.
    """
    from vitbn.models import build_model

    model = unwrap(model)
    old = model.config
    check_adaptable(old, pair(image_size), channels)
    new_head = num_classes != old.num_classes if new_head is None else new_head
    new = build_model(dataclasses.replace(old, num_classes=num_classes, image_size=image_size, channels=channels))
    source = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    grids = (tuple(model.to_patch_embedding.grid), tuple(new.to_patch_embedding.grid))
    state, notes = {}, []
    for key, value in new.state_dict().items():
        if key.startswith("mlp_head.") and new_head:
            state[key] = torch.zeros_like(value)
        elif key == "pos_embedding" and grids[0] != grids[1]:
            state[key] = resample_pos_embedding(source[key], *grids, has_cls=old.has_class_token)
        elif channels != old.channels and (key == _PATCH_WEIGHT or key.startswith(_PATCH_NORM)):
            state[key] = _carry_channels(key, source[key], value, old, channels)
        elif key in source and source[key].shape == value.shape:
            state[key] = source[key].clone()
        else:  # a layout this function does not know how to carry
            shape = tuple(source[key].shape) if key in source else "absent"
            raise ValueError(f"adapt_model cannot carry {key}: {shape} -> {tuple(value.shape)}")
    new.load_state_dict(state)
    notes += _notes(old, new.config, grids, new_head)
    return new, notes


def _carry_channels(key: str, tensor: torch.Tensor, like: torch.Tensor, old, channels: int) -> torch.Tensor:
    if tensor.shape == like.shape:  # a norm's scalar (statistics over all pixels, DyT's alpha, a counter)
        return tensor.clone()
    ph, pw = pair(old.patch_size)
    return adapt_channels(tensor, ph * pw, channels, sums=key == _PATCH_WEIGHT)


def _notes(old, new, grids: tuple, new_head: bool) -> list[str]:
    notes = []
    if new_head:
        notes.append(f"new head: {old.num_classes} -> {new.num_classes} classes (zero-initialized)")
    if grids[0] != grids[1]:
        (h, w), (nh, nw) = grids
        how = "resampled (bicubic)" if old.pos_emb == "learn" else f"rebuilt ({old.pos_emb})"
        notes.append(f"position table {how} from {h}x{w} to {nh}x{nw} patches")
    if new.channels != old.channels:
        rule = "summed over channels" if new.channels == 1 else f"repeated and scaled by {old.channels}/{new.channels}"
        notes.append(f"patch embedding adapted from {old.channels} to {new.channels} channel(s): weights {rule}")
    return notes


def resize_split(split, size: tuple[int, int]):
    """A ``Split`` whose images are resized to ``size`` (H, W): bilinear, antialiased (which matters when they
    shrink), rounded back to uint8; in chunks, so no float copy of the whole split is made."""
    from vitbn.data import Split

    images = split.images
    if tuple(images.shape[2:]) == tuple(size):
        return split
    out = torch.empty(len(split), images.shape[1], *size, dtype=torch.uint8)
    for start in range(0, len(split), _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()  # (n, C, H, W) on the 0..255 scale
        chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[start : start + len(chunk)] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return Split(out, split.labels)


def resize_data(data, size: int | tuple[int, int], splits: tuple[str, ...] = ("train", "val", "test")):
    """``PreparedData`` with its ``splits`` resized (``resize_split``) once, before training or evaluation; the
    others are dropped (an evaluation needs the test split only). Its ``info`` says the new shape and holds the
    resized train and test splits; the mean and std stay the dataset's, so that the model's input spec names the
    dataset's normalization."""
    size = pair(size)
    if min(size) <= 0:
        raise UserError(f"image_size={size} must be positive")
    empty = data.train.head(0)
    new = {s: resize_split(getattr(data, s), size) if s in splits and getattr(data, s) is not None else None
           for s in ("train", "val", "test")}  # fmt: skip
    train, test = new["train"] or resize_split(empty, size), new["test"] or resize_split(empty, size)
    info = dataclasses.replace(data.info, train=train, test=test, shape=(data.info.shape[0], *size))
    return dataclasses.replace(data, train=train, val=new["val"], test=test, info=info)
