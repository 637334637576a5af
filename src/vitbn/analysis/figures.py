"""Figures of ``vitbn analyze``: attention over the image (per layer, rollout, per head), the loss-landscape slice
and the per-block sharpness and activity. Pure functions: arrays in, matplotlib Figures out (Agg backend);
``save_png`` writes one.

Sizes are fixed (no tight bounding box), so a figure's PNG has a known size: an attention grid of ``rows`` x
``cols`` panels is ``cols * CELL * DPI`` by ``(rows * CELL + TITLE) * DPI`` pixels (``grid_pixels``).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first: figures are made headless)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CELL = 1.5  # inches per panel of an attention grid
TITLE = 0.5  # inches above the panels for the title
DPI = 100
OVERLAY_ALPHA = 0.55


def grid_pixels(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG of an attention grid of ``rows`` x ``cols`` panels."""
    return round(cols * CELL * DPI), round((rows * CELL + TITLE) * DPI)


def pooled_name(class_token: bool) -> str:
    """What the maps are of: the CLS token, or with mean pooling the mean of the output tokens."""
    return "CLS token" if class_token else "mean token (no CLS)"


def _as_picture(image: np.ndarray | torch.Tensor) -> tuple[np.ndarray, str | None]:
    """A (C, H, W) uint8 image -> (H, W) gray or (H, W, 3) RGB in [0, 1], and the colormap to show it with."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    return (x[0], "gray") if x.shape[0] == 1 else (np.moveaxis(x, 0, -1), None)


def _upsampled(patch_map: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) -> (H, W), bilinear: the map over the patch grid drawn at the image's resolution."""
    t = torch.as_tensor(np.asarray(patch_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(ax, image, patch_map, title: str | None = None) -> None:
    picture, cmap = _as_picture(image)
    ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0)
    if patch_map is not None:
        ax.imshow(_upsampled(patch_map, picture.shape[:2]), cmap="inferno", alpha=OVERLAY_ALPHA)
    if title:
        ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def attention_grid(
    images: np.ndarray | torch.Tensor,
    layer_maps: np.ndarray | torch.Tensor,
    rollout_maps: np.ndarray | torch.Tensor,
    *,
    class_token: bool,
    labels: list[str] | None = None,
) -> Figure:
    """One row per image: the image, then each layer's attention of the pooled token over the patches (head
    mean), then the rollout, each drawn over the image.

    Args:
        images: (B, C, H, W) uint8.
        layer_maps: (B, L, gh, gw), each map summing to 1 over the patches.
        rollout_maps: (B, gh, gw).
        class_token: whether the pooled token is the CLS token (else the mean token; the title says which).
        labels: a caption per image (e.g. its index and class).
    """
    b, layers = layer_maps.shape[:2]
    cols = layers + 2
    fig, axes = plt.subplots(b, cols, figsize=(cols * CELL, b * CELL + TITLE), squeeze=False, layout="constrained")
    for i in range(b):
        overlay(axes[i, 0], images[i], None, labels[i] if labels else "input")
        for layer in range(layers):
            overlay(axes[i, layer + 1], images[i], layer_maps[i, layer], f"layer {layer + 1}" if i == 0 else None)
        overlay(axes[i, -1], images[i], rollout_maps[i], "rollout" if i == 0 else None)
    fig.suptitle(f"attention of the {pooled_name(class_token)} over the patches (head mean)", fontsize=10)
    return fig


def head_grid(image: np.ndarray | torch.Tensor, head_maps: np.ndarray | torch.Tensor, *, class_token: bool) -> Figure:
    """Layers x heads: each head's attention of the pooled token over the patches, drawn over ``image``.

    Args:
        image: (C, H, W) uint8.
        head_maps: (L, heads, gh, gw) (a parallel stage's heads branch-major).
        class_token: whether the pooled token is the CLS token.
    """
    layers, heads = head_maps.shape[:2]
    fig, axes = plt.subplots(
        layers, heads, figsize=(heads * CELL, layers * CELL + TITLE), squeeze=False, layout="constrained"
    )
    for layer in range(layers):
        for head in range(heads):
            title = f"layer {layer + 1} head {head + 1}"
            overlay(axes[layer, head], image, head_maps[layer, head], title)
    fig.suptitle(f"attention of the {pooled_name(class_token)} per head", fontsize=10)
    return fig


def landscape_plot(alphas: list[float], loss: list[float], acc: list[float], title: str) -> Figure:
    """The loss (left axis) and accuracy (right axis) along the slice against alpha."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(alphas, loss, marker="o", color="C0", label="loss")
    ax.set_xlabel("alpha (filter-normalized direction)")
    ax.set_ylabel("training loss", color="C0")
    ax.axvline(0.0, color="0.6", linewidth=0.8)
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(alphas, acc, marker=".", linestyle="--", color="C1", label="accuracy")
    right.set_ylabel("training accuracy", color="C1")
    right.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=10)
    return fig


def block_bars(lambdas: dict[str, float], active: dict[str, float], title: str) -> Figure:
    """Two bar charts: lambda_max per parameter block and the active fraction per stage."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    left.bar(range(len(lambdas)), list(lambdas.values()), color="C0")
    left.set_xticks(range(len(lambdas)), list(lambdas), rotation=45, ha="right", fontsize=8)
    left.set_ylabel("lambda_max (block Hessian)")
    right.bar(range(len(active)), list(active.values()), color="C2")
    right.set_xticks(range(len(active)), list(active), rotation=45, ha="right", fontsize=8)
    right.set_ylabel("active fraction (GELU input > 0)")
    right.set_ylim(0.0, 1.0)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
        if not len(ax.patches):
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Writes the figure as a PNG at ``DPI`` (to a temporary name, then renamed) and closes it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
