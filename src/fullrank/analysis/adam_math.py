"""Adam's correction ψ and the scaling factor φ = ‖ψ(X)‖ / ‖X‖ (Fira paper eq. 9–11).

A *shadow* Adam keeps its own moments of a matrix (G, R = Pᵀ·G or the residual G − P·R) without
touching the model: the probes use it to measure φ on the same gradients the real run sees.
"""
from __future__ import annotations

import torch


def adam_correction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, betas: tuple[float, float],
                    eps: float) -> torch.Tensor:
    """ψ = m̂ / (√v̂ + ε) with torch's bias corrections (eq. 4–5), from moments after ``step`` updates."""
    beta1, beta2 = betas
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    return (exp_avg / bias1) / (exp_avg_sq.sqrt() / bias2 ** 0.5 + eps)


def preconditioner(exp_avg_sq: torch.Tensor, step: int, beta2: float, eps: float) -> torch.Tensor:
    """The element-wise factor c = 1 / (√v̂ + ε) of Adam: ψ(X) = c ∘ m̂ (c ∘ X when β1 = 0)."""
    return 1.0 / (exp_avg_sq.sqrt() / (1.0 - beta2 ** step) ** 0.5 + eps)


def scaling_factor(corrected: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Matrix-level φ = ‖ψ(X)‖_F / ‖X‖_F (eq. 10), a 0-d tensor (NaN when X = 0)."""
    return torch.linalg.vector_norm(corrected) / torch.linalg.vector_norm(raw)


def column_scaling_factors(corrected: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Column-level φ_j = ‖ψ(X)[:, j]‖ / ‖X[:, j]‖ (eq. 11), one per column."""
    return torch.linalg.vector_norm(corrected, dim=0) / torch.linalg.vector_norm(raw, dim=0)


class ShadowAdam:
    """Adam moments of one matrix, updated from gradients the caller supplies (no parameter)."""

    def __init__(self, shape: tuple[int, ...], betas: tuple[float, float], eps: float, device, dtype=torch.float32):
        self.exp_avg = torch.zeros(shape, device=device, dtype=dtype)
        self.exp_avg_sq = torch.zeros(shape, device=device, dtype=dtype)
        self.betas, self.eps, self.step = betas, eps, 0

    def update(self, grad: torch.Tensor) -> torch.Tensor:
        """Take one Adam moment update with ``grad``; returns ψ(grad)."""
        beta1, beta2 = self.betas
        self.step += 1
        self.exp_avg.lerp_(grad, 1.0 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        return adam_correction(self.exp_avg, self.exp_avg_sq, self.step, self.betas, self.eps)

    def preconditioner(self) -> torch.Tensor:
        return preconditioner(self.exp_avg_sq, self.step, self.betas[1], self.eps)
