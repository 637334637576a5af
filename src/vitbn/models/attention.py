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
  TorchScript tracing, ``"auto"`` is the fused kernel: nothing can be timed inside a graph being captured.

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
                path = "fused"
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
    k, b, n, _ = qkv.shape
    inner = heads * dim_head
    # (K, B, N, 3*H*Dh) -> (3, B, K, H, N, Dh), a strided view
    parts = qkv[..., : 3 * inner].view(k, b, n, 3, heads, dim_head).permute(3, 1, 0, 4, 2, 5)
    # (K, B, N, H) -> (B, K*H, 1, N): one term per key, the same for every query
    term = qkv[..., 3 * inner :].permute(1, 0, 3, 2).reshape(b, k * heads, 1, n) if key_term else None
    if path == "plain":
        out, attn = _plain(parts, term, scale, drop)
        return out, attn if return_attn else None
    if path != "fused":
        raise ValueError(f"path={path!r} is not one of {', '.join(map(repr, PATHS))}")
    q, key, v = (t.flatten(1, 2) for t in parts.unbind(0))  # (B, K*H, N, Dh): views for K = 1
    out = F.scaled_dot_product_attention(q, key, v, attn_mask=term, dropout_p=dropout_p)
    out = out.transpose(1, 2).reshape(b, n, -1)
    if not return_attn:
        return out, None
    scores = q @ key.transpose(-1, -2) * scale  # the weights only; the output above stays the fused kernel's
    return out, _softmax(scores if term is None else scores + term)


def _plain(
    parts: torch.Tensor, term: torch.Tensor | None, scale: float, drop: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, B, K, H, N, Dh) -> one head-major copy (3, B*K*H, N, Dh), scores by one batched product scaled inside
    it (``alpha``), softmax, the weighted values by a second batched product."""
    _, b, k, h, n, dh = parts.shape
    q, key, v = parts.reshape(3, b * k * h, n, dh).unbind(0)
    if term is None:  # beta = 0: the input is not read, nothing is written before the product
        scores = torch.baddbmm(q.new_zeros(()), q, key.transpose(1, 2), beta=0.0, alpha=scale)
    else:
        scores = torch.baddbmm(term.reshape(b * k * h, 1, n), q, key.transpose(1, 2), alpha=scale)
    attn = _softmax(scores)  # (B*K*H, N, N)
    out = torch.bmm(drop(attn), v)  # (B*K*H, N, Dh)
    out = out.view(b, k * h, n, dh).transpose(1, 2).reshape(b, n, k * h * dh)
    return out, attn.view(b, k * h, n, n)


_HALF = (torch.bfloat16, torch.float16)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; half-precision scores are normalized in fp32 and rounded once (as CUDA
    autocast does): the CPU's half-precision softmax over a few keys is slow, and less accurate."""
    if scores.dtype in _HALF:
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    return scores.softmax(dim=-1)


# --- "auto": choice by measurement -------------------------------------------------------------------------------


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
