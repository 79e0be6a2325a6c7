"""A plain, readable implementation of the paper's update (eq. 2–12) for one weight matrix.

Written from the equations, not from the engine: explicit residual G − P·R, explicit S, explicit
limiter. The engine's fused step must reproduce it.
"""
from __future__ import annotations

import torch

PHI_EPS = 1e-8


def top_subspace(G, rank, side):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    left = U[:, :rank] if side in ("left", "both") else None
    right = Vh[:rank, :] if side in ("right", "both") else None
    return left, right


def side_of(proj_type, shape):
    m, n = shape
    return {
        "std": "right" if m >= n else "left",
        "reverse_std": "left" if m >= n else "right",
        "left": "left",
        "right": "right",
        "full": "both",
    }[proj_type]


def down(G, left, right):
    R = G
    if left is not None:
        R = left.T @ R
    if right is not None:
        R = R @ right.T
    return R


def up(X, left, right):
    if left is not None:
        X = left @ X
    if right is not None:
        X = X @ right
    return X


def phi_of(rule, psi, R, side):
    """φ of eq. 10 (matrix) or eq. 11 (column: one factor per column of G kept by the projection)."""
    if rule == "add":
        return torch.tensor(1.0, dtype=R.dtype)
    if rule == "scale_matrix":
        return psi.norm() / (R.norm() + PHI_EPS)
    dim = 0 if side == "left" else 1  # left: R is r×n, columns; right: R is m×r, rows
    return psi.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + PHI_EPS)


def reference_run(W0, grads, *, rank, update_proj_gap, scale, lr, betas=(0.9, 0.999), eps=1e-8,
                  weight_decay=0.0, residual="scale_column", limiter="norm_growth", gamma=1.01,
                  clip_threshold=1.0, proj_type="std", convention="exact", granularity="column",
                  multiplier=1.0, limiter_alpha=0.5):
    """Weights after each step, and the S norms, for the gradient sequence ``grads``.

    ``granularity`` (column | tensor) and ``multiplier`` apply to ``only_scaling`` (APOLLO's
    channel/tensor factor and its √scale on the limited update).
    """
    beta1, beta2 = betas
    W = W0.clone()
    M = V = left = right = None
    previous_norm = None
    history, s_norms = [], []
    for t, G in enumerate(grads, start=1):
        side = side_of(proj_type, G.shape)
        if (t - 1) % update_proj_gap == 0:
            left, right = top_subspace(G, rank, side)
        R = down(G, left, right)  # eq. 2
        if M is None:
            M, V = torch.zeros_like(R), torch.zeros_like(R)
        M = beta1 * M + (1 - beta1) * R  # eq. 4
        V = beta2 * V + (1 - beta2) * R * R
        psi = (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + eps)  # eq. 5
        if residual == "discard":
            update = scale * up(psi, left, right)  # GaLore, eq. 3
        else:
            level = {"column": "scale_column", "tensor": "scale_matrix"}[granularity]
            phi = phi_of(level if residual == "only_scaling" else residual, psi, R, side)
            kappa = scale if convention == "official" else 1.0
            if residual == "only_scaling":
                S = phi * G
            else:
                S = phi * (G - kappa * up(R, left, right))  # eq. 8–11
            norm = S.norm()
            if limiter == "norm_growth":  # eq. 12
                if previous_norm is not None and previous_norm > 0 and norm / previous_norm > gamma:
                    S = S * (gamma * previous_norm / norm)
                previous_norm = S.norm()
            elif limiter == "clip":
                if norm > clip_threshold:
                    S = S * (clip_threshold / norm)
            elif limiter == "gradient_shrink":  # rebuttal Table r10: ‖S_t‖ ← a‖S_t‖ + (1 − a)‖S_{t−1}‖
                if previous_norm is not None and previous_norm > 0 and norm > 0:
                    S = S * ((limiter_alpha * norm + (1 - limiter_alpha) * previous_norm) / norm)
                previous_norm = S.norm()
            elif limiter == "tensor_scaling":  # rebuttal Table r10: S_t ← a·S_t
                S = limiter_alpha * S
            s_norms.append(S.norm().item())
            update = multiplier * S if residual == "only_scaling" else scale * up(psi, left, right) + S  # eq. 7
        W = W * (1 - lr * weight_decay) - lr * update
        history.append(W.clone())
    return history, s_norms


def engine_run(W0, grads, optimizer=None, **options):
    """Weights after each step of ``optimizer`` (a SubspaceAdamW class) on one matrix, and the optimizer."""
    import fullrank

    optimizer = optimizer or fullrank.SubspaceAdamW
    W = torch.nn.Parameter(W0.clone())
    opt = optimizer([{"params": [W], "rank": options.pop("rank")}], **options)
    history = []
    for G in grads:
        W.grad = G.clone()
        opt.step()
        history.append(W.detach().clone())
    return history, opt
