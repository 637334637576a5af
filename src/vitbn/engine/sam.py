"""Sharpness-aware minimization (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021) around any base
optimizer, safe with BatchNorm, dropout and stochastic depth.

One SAM step, for a batch and loss L:

1. the gradient g = dL/dw at w (the normal forward/backward; BatchNorm updates its running statistics here,
   once, exactly as without SAM);
2. the ascent ε̂ = ρ·g/‖g‖ (SAM) or ε̂ = ρ·T²g/‖Tg‖ with T = |w| element-wise (ASAM);
3. the gradient at w + ε̂ on the same batch, with the same batch-statistics mode and the same random draws
   (dropout, drop-path masks) as pass 1, and BatchNorm's running statistics left untouched;
4. w is restored exactly (a saved copy, not w + ε̂ - ε̂) and the base optimizer steps with the gradient of 3.

Under DDP both backward passes all-reduce, so ε̂ is computed from the global gradient and every rank perturbs
and steps identically. With a GradScaler (fp16) the gradients of pass 1 are scaled, which leaves ε̂ unchanged
(ε̂ is invariant to the scale of g); non-finite gradients make w + ε̂ non-finite, so the scaler skips the step
and w is restored: no host synchronization is needed for the check.
"""

from __future__ import annotations

import torch

__all__ = ["SAM", "RandomReplay"]


class SAM:
    """The perturbation of a SAM/ASAM step, around ``base`` (Adam, AdamW, SGD...), which does the update.

    ``perturb`` moves the parameters to w + ε̂ using their current gradients; ``restore`` puts w back. The engine's
    ``train_step`` runs the two passes around them. The state to checkpoint is the base optimizer's.

    Args:
        base: the optimizer that steps; ε̂ is applied to the parameters of its groups.
        rho: radius ρ of the neighbourhood (> 0; 0.05 is the paper's default for SAM, ASAM uses larger, e.g. 0.5-2).
        adaptive: ASAM: scale ε̂ element-wise by |w|, which makes the sharpness invariant to rescaling of weights.
        eps: added to ‖g‖ so that a zero gradient gives ε̂ = 0.
    """

    def __init__(self, base: torch.optim.Optimizer, *, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12):
        if not rho > 0:
            raise ValueError(f"sam_rho={rho!r} must be > 0")
        self.base, self.rho, self.adaptive, self.eps = base, float(rho), bool(adaptive), eps
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def ascent(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, ε̂)`` for every parameter with a gradient, from the gradients as they are now."""
        params = self._params()
        if not params:
            return []
        grads = [p.grad for p in params]
        if self.adaptive:
            weights = torch._foreach_abs(params)
            scaled = torch._foreach_mul(grads, weights)  # T g
        else:
            weights, scaled = None, grads
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(scaled)]))
        factor = self.rho / (norm + self.eps)
        steps = torch._foreach_mul(scaled, weights) if self.adaptive else list(grads)  # T² g, or g
        steps = torch._foreach_mul(steps, factor.to(grads[0].dtype))
        return list(zip(params, steps, strict=True))

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + ε̂, keeping a copy of w for ``restore``."""
        if self._saved:
            raise RuntimeError("SAM.perturb called twice without restore")
        pairs = self.ascent()
        self._saved = [(p, p.detach().clone()) for p, _ in pairs]
        if pairs:
            torch._foreach_add_([p for p, _ in pairs], [e for _, e in pairs])

    @torch.no_grad()
    def restore(self) -> None:
        """w <- the copy taken by ``perturb`` (bit-exact)."""
        for p, saved in self._saved:
            p.copy_(saved)
        self._saved = []


class RandomReplay:
    """Snapshot of the global generators (CPU, and the device's) so a second forward pass draws the same dropout
    and drop-path masks as the first. ``replay()`` rewinds them to the snapshot."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def replay(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
