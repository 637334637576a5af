"""The sharpness of the training loss: the largest eigenvalue of its Hessian (lambda_max), for all parameters or
for one block of them, by power iteration on Hessian-vector products.

The loss is the mean cross-entropy over a fixed set of images (``Batches``); a Hessian-vector product is the
double backward ``grad(grad(L) . v)`` summed over the batches, each weighted by its share of the images, so it
is the product with the Hessian of the loss averaged over all images. Parameters outside the chosen subset are
held fixed (the Hessian's diagonal block of the subset).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitbn.analysis.common import Batches, analysis_mode, num_images, parameter_blocks

# (iteration, current estimate) after each Hessian-vector product: for progress bars.
Callback = Callable[[int, float], None]
MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Eigen:
    """An eigenvalue estimate of power iteration.

    Attributes:
        value: the estimate (a Rayleigh quotient).
        residual: ``||Hv - value v|| / |value|`` for the unit vector ``v`` of the estimate.
        iterations: Hessian-vector products spent (both runs when the shifted one was needed).
        converged: whether successive estimates agreed within the tolerance before the cap.
        shifted: whether the value came from the shifted iteration (the dominant eigenvalue was negative).
    """

    value: float
    residual: float
    iterations: int
    converged: bool
    shifted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def hvp(model: nn.Module, batches: Batches, params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]):
    """The Hessian-vector product ``H v`` of the mean cross-entropy over all images of ``batches`` with respect to
    ``params`` (the others held fixed), ``v`` given as one tensor per parameter. The model is used in the mode it
    is in (see ``analysis_mode``). Fused attention runs through ``scaled_dot_product_attention``'s math kernel,
    whose backward can be differentiated again (the flash kernels' cannot).

    Returns:
        A list of tensors shaped like ``params``.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    total = num_images(batches)
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        with sdpa_kernel([SDPBackend.MATH]):
            loss = F.cross_entropy(model(x), y) * (len(y) / total)  # this batch's share of the mean
            grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        for acc, h in zip(out, torch.autograd.grad(dot, params)):
            acc.add_(h)
    return out


def hessian_matvec(model: nn.Module, batches: Batches, params: Sequence[torch.Tensor]) -> MatVec:
    """``v -> H v`` on flat vectors (the parameters' elements concatenated in order); the model must be in the
    mode of the analysis while it is called."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def matvec(flat: torch.Tensor) -> torch.Tensor:
        vector = [chunk.view(shape) for chunk, shape in zip(flat.split(sizes), shapes)]
        return torch.cat([h.reshape(-1) for h in hvp(model, batches, params, vector)])

    return matvec


def power_iteration(
    matvec: MatVec,
    size: int,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
    name: str = "",
) -> Eigen:
    """The largest (algebraic) eigenvalue of a symmetric operator by power iteration from a seeded random start.

    Power iteration finds the eigenvalue of largest magnitude, ``lambda_d``. When it is negative, a second run on
    ``H - lambda_d I`` (whose eigenvalues ``mu - lambda_d`` are all >= 0, the largest being ``lambda_max -
    lambda_d``) gives the largest algebraic eigenvalue; ``shifted`` says so. Iteration stops when successive
    estimates agree to ``tol`` relative (to the larger of the estimate and, in the shifted run, its shifted
    value), or after ``max_iter`` products per run; then a one-line warning gives the estimate and its residual.

    Args:
        matvec: ``v -> H v`` on vectors of ``size`` elements.
        size: the dimension.
        tol: relative tolerance on successive estimates.
        max_iter: the cap on products per run.
        seed: seeds the start vector.
        device: where the vectors live.
        dtype: their floating type.
        callback: called with (iteration, estimate) after each product.
        name: what the operator is, for the warning (e.g. a parameter block).
    """
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be > 0")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1")
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(size, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    first = _iterate(matvec, start, tol, max_iter, callback, offset=0)
    result = first
    if first.converged and first.value < 0:  # an unconverged sign says nothing yet
        shift = first.value

        def shifted(v: torch.Tensor) -> torch.Tensor:
            return matvec(v) - shift * v

        second = _iterate(shifted, start, tol, max_iter, callback, offset=first.iterations, shift=shift)
        result = Eigen(second.value, second.residual, first.iterations + second.iterations, second.converged, True)
    if not result.converged:
        of = f" of {name}" if name else ""
        warnings.warn(
            f"lambda_max{of}: power iteration did not converge in {max_iter} iterations (tol {tol:g}): estimate "
            f"{result.value:.6g}, residual {result.residual:.3g}",
            stacklevel=2,
        )
    return result


def _iterate(
    matvec: MatVec, v: torch.Tensor, tol: float, max_iter: int, callback, *, offset: int, shift: float = 0.0
) -> Eigen:
    """Power iteration on ``matvec`` (which is ``H - shift I``); the value and residual returned are of ``H``."""
    v = v / v.norm()
    previous, value, residual = None, 0.0, math.inf
    for it in range(1, max_iter + 1):
        hv = matvec(v)
        estimate = float(torch.dot(v, hv))  # Rayleigh quotient of the shifted operator
        value = estimate + shift
        # ||H v - value v|| = ||(H - shift I) v - estimate v||
        residual = float((hv - estimate * v).norm()) / abs(value) if value != 0 else float((hv - estimate * v).norm())
        if callback is not None:
            callback(offset + it, value)
        norm = float(hv.norm())
        if norm == 0.0:  # v is in the null space: the operator is 0 along it
            return Eigen(value, residual, it, True)
        # relative to the shifted estimate too: near 0 (possible after a shift) a relative step never shrinks
        if previous is not None and abs(value - previous) <= tol * max(abs(value), abs(estimate)):
            return Eigen(value, residual, it, True)
        previous, v = value, hv / norm
    return Eigen(value, residual, max_iter, False)


def lambda_max(
    model: nn.Module,
    batches: Batches,
    params: Sequence[torch.Tensor] | None = None,
    *,
    bn_mode: str = "eval",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    callback: Callback | None = None,
    name: str = "",
) -> Eigen:
    """The largest eigenvalue of the Hessian of the mean cross-entropy over ``batches`` with respect to ``params``
    (default: every trainable parameter), by ``power_iteration`` (see there for the negative case and the
    warning when it does not converge).

    Args:
        model: the model; its train/eval state and BatchNorm running statistics are left as they were.
        batches: the fixed image set, normalized, on the model's device.
        params: the subset of parameters; the others are held fixed.
        bn_mode: ``"eval"`` (running statistics: the loss is a deterministic function of the weights) or
            ``"train"`` (each batch's statistics, as in a training step); dropout and stochastic depth are off.
        tol: relative tolerance on successive estimates.
        max_iter: the cap on Hessian-vector products (per run).
        seed: seeds the start vector.
        callback: called with (iteration, estimate) after each product.
        name: names the parameters in the warning (e.g. ``"block1.attn"``).
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("lambda_max needs at least one parameter")
    size = sum(p.numel() for p in params)
    with analysis_mode(model, bn_mode, math_attention=True):
        matvec = hessian_matvec(model, batches, params)
        return power_iteration(
            matvec, size, tol=tol, max_iter=max_iter, seed=seed, device=params[0].device, dtype=params[0].dtype,
            callback=callback, name=name,
        )  # fmt: skip


def block_lambda_max(
    model: nn.Module,
    batches: Batches,
    *,
    blocks: Sequence[str] | None = None,
    on_block: Callable[[str], Callback | None] | None = None,
    **options,
) -> dict[str, Eigen]:
    """``lambda_max`` of each parameter block (``parameter_blocks``; ``blocks`` picks some by name), the other
    parameters held fixed.

    Args:
        model: the model.
        batches: the fixed image set.
        blocks: names of the blocks (default: all of them, in order).
        on_block: returns the callback of a block's iteration, given its name (progress bars).
        **options: of ``lambda_max`` (``bn_mode``, ``tol``, ``max_iter``, ``seed``).
    """
    all_blocks = parameter_blocks(model)
    names = list(all_blocks) if blocks is None else list(blocks)
    unknown = [n for n in names if n not in all_blocks]
    if unknown:
        raise ValueError(f"unknown parameter block(s) {unknown}; the model has {', '.join(all_blocks)}")
    results = {}
    for name in names:
        if not all_blocks[name]:
            continue  # e.g. a head of a frozen model: nothing to differentiate
        callback = on_block(name) if on_block is not None else None
        results[name] = lambda_max(model, batches, all_blocks[name], callback=callback, name=name, **options)
    return results
