"""What both evaluations share: the Fréchet distance, per-seed summaries, loading an export."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import load_config
from ..core.layout import NetworkLayout
from ..core.models import build_autoencoder
from ..core.sampler import build_schedule
from ..train.export import CONFIG_NAME, load_exported_networks

__all__ = ["frechet_distance", "load_export", "scored_schedules", "seed_summary"]


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two (N, D) feature sets.

    FID's formula in float64. ``tr((S_a S_b)^(1/2))`` is computed as the sum of the square roots
    of the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum), which stays
    exact when a covariance is singular (dead ReLU features, or a few distinct images) where a
    general matrix square root of ``S_a S_b`` is ill-conditioned.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("each feature set needs at least 2 rows for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    trace_root = float(np.sqrt(middle).sum())
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    return mean_term + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * trace_root


def seed_summary(per_seed: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """``<key>_mean`` / ``<key>_std`` (sample std; 0 for one seed) over the seeds that report
    ``key`` (a key no seed reports is left out), and ``num_seeds``."""
    out: dict[str, Any] = {}
    for key in keys:
        values = np.array([s[key] for s in per_seed if key in s])
        if len(values):
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out["num_seeds"] = len(per_seed)
    return out


def scored_schedules(
    config: Any, num_steps: Sequence[int], by_k: dict[str, Any]
) -> Iterator[tuple[int, Any]]:
    """(K, sampler schedule) for each K an export can be sampled at; a K that per-step networks
    were not trained for is recorded in ``by_k`` as skipped instead."""
    trained_steps = config.trajectory.num_steps
    layout = NetworkLayout(config.model)
    for k in num_steps:
        if (why := layout.sampling_steps_error(k, trained_steps)) is not None:
            by_k[str(k)] = {"skipped": why}
            continue
        yield k, build_schedule(config.sampler, k)


def load_export(export_dir: str | os.PathLike, device: torch.device) -> tuple[Any, nn.Module, Any]:
    """An export's config, its networks (eval mode, on ``device``) and its decoder (the VAE of
    ``model.vae_path``, or the identity in pixel space), as ``e2ed2 sample`` loads them."""
    config = load_config(str(Path(export_dir) / CONFIG_NAME))
    networks = load_exported_networks(export_dir, config.trajectory.num_steps).to(device).eval()
    decode = build_autoencoder(config.model).to(device).decode
    return config, networks, decode
