"""Multi-head attention on a fused qkv projection: two paths, and ``"auto"``, which picks between them by
measuring.

- ``"fused"``: ``F.scaled_dot_product_attention``, reading q, k and v in place from the projection.
- ``"plain"``: one copy of q, k and v into a contiguous head-major layout, two batched products and a softmax.
  It also returns the attention weights (analysis) and runs the K branches of a parallel stage as one batch.
- ``"auto"``: at the first call for a (device, dtype, shape, grad mode), both paths are timed on the module's own
  projection (a few warm-up calls, then interleaved timed calls, forward and, with grad on, backward), and the
  faster one is kept for the process, like cuDNN's benchmark mode. Each module records the choices it used
  (``attention_choices``) so that a run can log them and a resumed run can reuse them
  (``load_attention_choices``). ``VITBN_ATTN_AUTO=fused|plain`` pins the choice without measuring (identical
  paths across processes, e.g. the ranks of a distributed run). Under ``torch.compile``, ``torch.export`` and
  TorchScript tracing nothing can be timed inside the graph being captured, so ``"auto"`` takes ``captured_path``.

The per-key score term: a model folded by ``vitbn.bn.fuse_bn`` may carry, after the 3*H*Dh features of q, k and
v, H more features per token, ``c = scale * b_q . k_j`` per head, added to every query's scores of key j (see
``vitbn.bn.fuse``); ``key_term`` says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

PATHS = ("fused", "plain")
AUTO_ENV = "VITBN_ATTN_AUTO"
WARMUP, REPEATS = 2, 5  # calls of each path before timing, and timed calls of each (interleaved)

_CHOICES: dict[str, str] = {}  # choice key -> path, for this process


class AttentionCore(nn.Module):
    """What the attention modules share: the heads, the dropout on the weights, the path (``impl``) and the
    choices ``"auto"`` made for this module (``attn_choices``, choice key -> path).

    Args:
        heads: H.
        dim_head: Dh.
        dropout: dropout on the attention weights (training only).
        impl: ``"auto"``, ``"fused"`` or ``"plain"``.
        drop: the dropout module of the plain path.
    """

    def __init__(self, *, heads: int, dim_head: int, dropout: float, impl: str, drop: nn.Module) -> None:
        super().__init__()
        self.heads, self.dim_head, self.impl = heads, dim_head, impl
        self.scale = dim_head**-0.5
        self.attn_dropout = dropout
        self.attn_drop = drop
        self.key_term = False  # set by fuse_bn when the projection carries the per-key score term
        self.attn_choices: dict[str, str] = {}

    def attend(self, qkv: torch.Tensor, return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention on the projection ``qkv`` (K, B, N, 3*H*Dh [+ H]); see ``attend``."""
        dropout_p = self.attn_dropout if self.training else 0.0

        def run(path: str, x: torch.Tensor, weights: bool = False):
            return attend(x, self.heads, self.dim_head, self.scale, self.attn_drop, path=path, dropout_p=dropout_p,
                          return_attn=weights, key_term=self.key_term)  # fmt: skip

        path = self.impl
        if path == "auto":
            if _capturing():  # no timing, no Python side effects, no shapes formatted into strings
                path = captured_path(qkv.device.type, _grad_mode(qkv))
            else:
                key = choice_key(qkv, self.heads, self.dim_head)
                path = self.attn_choices[key] = resolve_auto(key, qkv, run)
        return run(path, qkv, return_attn)


def attend(
    qkv: torch.Tensor,
    heads: int,
    dim_head: int,
    scale: float,
    drop: nn.Module,
    *,
    path: str,
    dropout_p: float,
    return_attn: bool = False,
    key_term: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of K branches at once on their projections ``qkv`` (K, B, N, 3*H*Dh), each branch's
    features ordered (3, H, Dh), then, with ``key_term``, H per-key score terms; K = 1 for a sequential block.
    The K*H heads run as one batch of heads.

    Returns:
        The (B, N, K*H*Dh) output, features ordered (K, H, Dh) (what one wide output projection takes), and with
        ``return_attn`` the (B, K*H, N, N) attention weights before dropout (else None). The fused path computes
        the weights beside its output, so capturing them leaves the output as it is.
    """
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {', '.join(map(repr, PATHS))}")
    k, b, n, _ = qkv.shape
    q, key, v, term = split_heads(qkv, heads, dim_head, key_term, head_major=path == "plain")
    if path == "plain":
        out, attn = _plain(q, key, v, term, scale, drop)
        return out, attn if return_attn else None
    out = F.scaled_dot_product_attention(q, key, v, attn_mask=term, dropout_p=dropout_p)
    out = out.transpose(1, 2).reshape(b, n, -1)
    if not return_attn:
        return out, None
    scores = q @ key.transpose(-1, -2) * scale  # the weights only; the output above stays the fused kernel's
    return out, _softmax(scores if term is None else scores + term)


def _plain(
    q: torch.Tensor, key: torch.Tensor, v: torch.Tensor, term: torch.Tensor | None, scale: float, drop: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-major q, k, v (B, K*H, N, Dh) (contiguous: ``split_heads(head_major=True)``): scores by one batched
    product scaled inside it (``alpha``), softmax, the weighted values by a second batched product."""
    b, kh, n, dh = q.shape
    q, key, v = q.reshape(b * kh, n, dh), key.reshape(b * kh, n, dh), v.reshape(b * kh, n, dh)  # views
    if term is None:  # beta = 0: the input is not read, nothing is written before the product
        scores = torch.baddbmm(q.new_zeros(()), q, key.transpose(1, 2), beta=0.0, alpha=scale)
    else:
        scores = torch.baddbmm(term.reshape(b * kh, 1, n), q, key.transpose(1, 2), alpha=scale)
    attn = _softmax(scores)  # (B*K*H, N, N)
    out = torch.bmm(drop(attn), v)  # (B*K*H, N, Dh)
    out = out.view(b, kh, n, dh).transpose(1, 2).reshape(b, n, kh * dh)
    return out, attn.view(b, kh, n, n)


# --- q, k and v out of the fused projection, and their gradients back into it ----------------------------------


def _head_views(qkv: torch.Tensor, heads: int, dim_head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(K, B, N, 3*H*Dh [+ H]) -> the (3, B, K, H, N, Dh) strided view of q, k and v, and the (K, B, N, H) view of
    the per-key terms (None where the projection has none)."""
    k, b, n, width = qkv.shape
    inner = heads * dim_head
    parts = qkv[..., : 3 * inner].view(k, b, n, 3, heads, dim_head).permute(3, 1, 0, 4, 2, 5)
    return parts, (qkv[..., 3 * inner :] if width > 3 * inner else None)


def _split(qkv: torch.Tensor, heads: int, dim_head: int, key_term: bool, head_major: bool) -> tuple:
    k, b, n, _ = qkv.shape
    parts, terms = _head_views(qkv, heads, dim_head)
    if head_major:
        parts = parts.contiguous()  # (3, B, K, H, N, Dh): one copy
    q, key, v = (t.flatten(1, 2) for t in parts.unbind(0))  # (B, K*H, N, Dh): views where the layout allows
    # (K, B, N, H) -> (B, K*H, 1, N): one term per key, the same for every query
    term = terms.permute(1, 0, 3, 2).reshape(b, k * heads, 1, n) if key_term else None
    return q, key, v, term


class _SplitHeads(torch.autograd.Function):
    """``_split`` with a backward that writes the gradients of q, k, v (and of the per-key terms) straight into one
    buffer in the projection's layout. Autograd's own backward of the split stacks the three gradients
    (``aten::cat``, a projection-sized copy) and then copies the stack into the projection's layout (another);
    this backward makes the one strided copy per part that the layout needs and nothing else. The forward and the
    gradient values are those of ``_split``."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, dim_head: int, key_term: bool, head_major: bool):
        ctx.heads, ctx.dim_head, ctx.shape, ctx.dtype, ctx.device = heads, dim_head, qkv.shape, qkv.dtype, qkv.device
        return _split(qkv, heads, dim_head, key_term, head_major)

    @staticmethod
    def backward(ctx, dq, dk, dv, dterm):
        k, b, n, _ = ctx.shape
        if _vmapped(dq, dk, dv, dterm):  # a vectorized Hessian or Jacobian: out of place, no writes
            return _stacked_grad(ctx, dq, dk, dv, dterm), None, None, None, None
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        # each view is taken just before its write: under double backward the writes give grad a history, and a
        # view taken earlier (or one of unbind's several views) may then not be written in place
        for i, g in enumerate((dq, dk, dv)):
            part = _head_views(grad, ctx.heads, ctx.dim_head)[0][i]  # (B, K, H, N, Dh), a view into grad
            part.zero_() if g is None else part.copy_(g.reshape(b, k, ctx.heads, n, ctx.dim_head))
        terms = _head_views(grad, ctx.heads, ctx.dim_head)[1]
        if terms is not None:
            if dterm is None:
                terms.zero_()
            else:  # (B, K*H, 1, N) -> (K, B, N, H)
                terms.copy_(dterm.reshape(b, k, ctx.heads, n).permute(1, 0, 3, 2))
        return grad, None, None, None, None


def _vmapped(*tensors: torch.Tensor | None) -> bool:
    """Whether any tensor is batched by vmap (torch.func's, or the legacy one of autograd.functional's
    ``vectorize=True``), where in-place writes of batched values into an unbatched buffer are refused."""
    f = torch._C._functorch
    return any(t is not None and (f.is_batchedtensor(t) or f.is_legacy_batchedtensor(t)) for t in tensors)


def _stacked_grad(ctx, dq, dk, dv, dterm) -> torch.Tensor:
    """The projection's gradient built out of place (autograd's way: a stack, then the layout), for vmap."""
    k, b, n, width = ctx.shape
    h, dh = ctx.heads, ctx.dim_head
    zeros = torch.zeros(b, k * h, n, dh, dtype=ctx.dtype, device=ctx.device)
    parts = torch.stack([zeros if g is None else g for g in (dq, dk, dv)])  # (3, B, K*H, N, Dh)
    grad = parts.reshape(3, b, k, h, n, dh).permute(2, 1, 4, 0, 3, 5).reshape(k, b, n, 3 * h * dh)
    if width == 3 * h * dh:
        return grad
    terms = torch.zeros(k, b, n, h, dtype=ctx.dtype, device=ctx.device) if dterm is None else (
        dterm.reshape(b, k, h, n).permute(1, 0, 3, 2))  # fmt: skip
    return torch.cat([grad, terms], dim=-1)


def split_heads(
    qkv: torch.Tensor, heads: int, dim_head: int, key_term: bool = False, *, head_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q, k and v (B, K*H, N, Dh) of K branches' projections ``qkv`` (K, B, N, 3*H*Dh [+ H]), and with
    ``key_term`` the (B, K*H, 1, N) per-key score terms. ``head_major``: q, k and v are copied once into a
    contiguous (3, B, K*H, N, Dh) layout (the batched products' input); else they are strided views (the fused
    kernel reads them in place). When a gradient is needed (and no graph is being captured), the backward writes
    the three gradients into the projection's layout directly (``_SplitHeads``; out of place under vmap)."""
    if not (torch.is_grad_enabled() and qkv.requires_grad) or _capturing():  # a graph being captured: plain ops
        return _split(qkv, heads, dim_head, key_term, head_major)
    if torch._C._are_functorch_transforms_active() or _vmapped(qkv):  # torch.func, vectorized autograd
        return _split(qkv, heads, dim_head, key_term, head_major)
    return _SplitHeads.apply(qkv, heads, dim_head, key_term, head_major)


_HALF = (torch.bfloat16, torch.float16)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; half-precision scores are normalized in fp32 and rounded once (as CUDA
    autocast does): the CPU's half-precision softmax over a few keys is slow, and less accurate."""
    if scores.dtype in _HALF:
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    return scores.softmax(dim=-1)


# --- "auto": choice by measurement -------------------------------------------------------------------------------


def captured_path(device_type: str, grad: bool) -> str:
    """The path ``"auto"`` takes inside a graph being captured, where nothing can be timed: the plain path for a
    training graph on a CPU, where inductor fuses its element-wise work around two batched products and the CPU
    flash kernel's backward runs slowly in a compiled bf16 graph; the fused kernel otherwise (inference graphs, and
    GPUs with their flash kernels). The evidence: ``benchmarks/attention_impl.py --compile``, whose figures are in
    docs/bench/attention_impl_compiled.md."""
    return "plain" if device_type == "cpu" and grad else "fused"


def _capturing() -> bool:
    """Whether a graph is being captured (compile, export, TorchScript): no timing, no Python side effects."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def _grad_mode(qkv: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and qkv.requires_grad


def choice_key(qkv: torch.Tensor, heads: int, dim_head: int) -> str:
    """What ``"auto"`` chooses per: device, dtype, shape (K, B, H, N, Dh) and grad mode, e.g.
    ``"cpu float32 1x40x2x17x8 grad"``."""
    k, b, n, _ = qkv.shape
    dtype = str(qkv.dtype).removeprefix("torch.")
    mode = "grad" if _grad_mode(qkv) else "no_grad"
    return f"{qkv.device} {dtype} {k}x{b}x{heads}x{n}x{dim_head} {mode}"


def resolve_auto(key: str, qkv: torch.Tensor, run: Callable) -> str:
    """The path ``"auto"`` takes for ``qkv`` (outside graph capture): pinned by ``VITBN_ATTN_AUTO``, else the
    process's cached choice for ``key`` (``choice_key``), measured now (``measure_paths``) at the key's first use.

    Args:
        key: ``choice_key`` of ``qkv``.
        qkv: the projection.
        run: ``run(path, qkv)`` computes attention on ``qkv`` by ``path``.
    """
    pinned = os.environ.get(AUTO_ENV)
    if pinned:
        if pinned not in PATHS:
            raise ValueError(f"{AUTO_ENV}={pinned!r} is not one of {', '.join(map(repr, PATHS))}")
        return pinned
    if key not in _CHOICES:
        seconds = measure_paths({path: _timed_call(run, path, qkv) for path in PATHS}, qkv.device)
        _CHOICES[key] = min(PATHS, key=lambda path: seconds[path])
    return _CHOICES[key]


def _timed_call(run: Callable, path: str, qkv: torch.Tensor) -> Callable[[], None]:
    """One call of ``path`` on a detached copy of the projection: forward, and backward when grad is on (the
    gradient reaches no parameter)."""
    grad = _grad_mode(qkv)
    x = qkv.detach().requires_grad_(grad)

    def call() -> None:
        out, _ = run(path, x)
        if grad:
            torch.autograd.grad(out, x, torch.ones_like(out))

    return call


def measure_paths(calls: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float]:
    """Seconds per call of each path: ``WARMUP`` calls each, then ``REPEATS`` timed calls of each, interleaved
    (drift in the machine's speed hits both alike), synchronized on CUDA; the median of each. Random draws
    (dropout) happen on a forked generator, so the run's random streams are not moved. Tests replace this
    function to choose without timing."""
    devices = [device.index or 0] if device.type == "cuda" else []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {path: [] for path in calls}
    with torch.random.fork_rng(devices=devices):
        for call in calls.values():
            for _ in range(WARMUP):
                call()
        for _ in range(REPEATS):
            for path, call in calls.items():
                sync()
                start = time.perf_counter()
                call()
                sync()
                times[path].append(time.perf_counter() - start)
    return {path: sorted(t)[len(t) // 2] for path, t in times.items()}


def attention_choices(model: nn.Module) -> dict[str, str]:
    """The paths ``"auto"`` chose for the attention modules of ``model`` (choice key -> path), sorted by key."""
    found: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, AttentionCore):
            found.update(module.attn_choices)
    return dict(sorted(found.items()))


def load_attention_choices(choices: dict[str, str]) -> None:
    """Makes ``"auto"`` take these choices (e.g. a checkpoint's) in this process, without measuring again."""
    for key, path in choices.items():
        if path not in PATHS:
            raise ValueError(f"attention choice {key!r}: {path!r} is not one of {', '.join(map(repr, PATHS))}")
    _CHOICES.update(choices)


def clear_attention_choices() -> None:
    """Forgets every choice of this process (the next call of each key measures again)."""
    _CHOICES.clear()
