"""The energy score: a strictly proper scoring rule over m samples per prompt.

De Bortoli et al. 2025, "Distributional Diffusion Models with Scoring Rules", eq. (10) (the
energy score of Gneiting & Raftery 2007, eq. 22): for one prompt with target ``x0`` and ``m >= 2``
samples ``x̂_1..x̂_m`` drawn independently (own start and step noise, same conditioning),

    L = (1/m) Σ_j ‖x̂_j − x0‖^β  −  λ / (2 m (m−1)) Σ_{j≠j'} ‖x̂_j − x̂_j'‖^β,

β ∈ (0, 2), λ ∈ [0, 1]. The first sum rewards accuracy, the second spread; with λ = 1 the expected
score is minimised only by the data distribution itself (strictly proper), not by its mean, which
is what L2 on the final sample collapses to. λ = 0 is the (β-power) distance of every sample to
the target, λ < 1 trades diversity for accuracy.

Distances here are root-mean-square over the elements of a sample (``‖·‖ / sqrt(D)``): a constant
rescaling of the norm keeps the rule proper and makes its weight independent of resolution.
"""

from __future__ import annotations

import torch

__all__ = ["energy_score"]


def _distance_power(mean_square: torch.Tensor, beta: float) -> torch.Tensor:
    """``sqrt(mean_square) ** beta`` with gradient 0 where the distance is exactly 0.

    sqrt's derivative is infinite at 0 (two identical samples, e.g. a deterministic sampler
    whose noise was shared): 0 * inf would be NaN, so zero distances take the subgradient 0.
    """
    positive = mean_square > 0
    safe = torch.where(positive, mean_square, torch.ones_like(mean_square))
    return torch.where(positive, safe.pow(beta / 2), torch.zeros_like(mean_square))


def energy_score(
    samples: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 1.0,
    lam: float = 1.0,
) -> torch.Tensor:
    """The mean over prompts of the energy score above.

    ``samples``: (B, m, *S), ``m >= 2`` samples per prompt; ``target``: (B, *S). Returns a float32
    scalar with the graph of ``samples``.
    """
    if samples.dim() != target.dim() + 1 or samples.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"energy_score: samples (B, m, *S) {tuple(samples.shape)} do not match target "
            f"(B, *S) {tuple(target.shape)}"
        )
    batch, m = samples.shape[:2]
    if m < 2:
        raise ValueError(f"energy_score needs m >= 2 samples per prompt, got {m}")
    if not 0 < beta < 2:
        raise ValueError(f"energy_score: beta must be in (0, 2), got {beta}")
    if not 0 <= lam <= 1:
        raise ValueError(f"energy_score: lambda must be in [0, 1], got {lam}")
    flat = samples.reshape(batch, m, -1).float()
    goal = target.reshape(batch, 1, -1).float()
    accuracy = _distance_power((flat - goal).square().mean(-1), beta).mean(dim=1)  # (B,)
    # All ordered pairs j != j' (the diagonal is zero and excluded from the count m (m - 1)).
    pairwise = (flat[:, :, None] - flat[:, None, :]).square().mean(-1)  # (B, m, m)
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=samples.device)
    spread = _distance_power(pairwise[:, off_diagonal], beta).sum(dim=1)  # (B,)
    return (accuracy - lam / (2 * m * (m - 1)) * spread).mean()
