"""A differentiable reward on the decoded final sample (DRaFT / AlignProp).

DRaFT (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
eq. 1) and AlignProp (Prabhudesai et al. 2023, Sec. 3) maximise a frozen, differentiable scorer
``r(D(ẑ0), c)`` of the sampler's final sample by backpropagating through the sampling chain,
usually only through its last k steps (``trajectory.truncation = last_k / random_k``, DRaFT-K;
random k is AlignProp's). The term here is the loss ``-mean_i r(D(ẑ0_i), c_i)``.

For the embedded digits the scorer is a prompted-digit classifier and the reward is the
log-probability of the prompted digit, ``r = log softmax(f(x))[label]``: bounded above by 0, with
a gradient that fades once the digit is read with confidence (unlike a raw logit, which a
sampler could push without limit). The classifier is *not* the one ``e2ed2 evaluate`` scores
with (eval/digits.py: a 3-conv CNN, seed 0): this one is an MLP on 8x8 average-pooled pixels,
trained with another seed, so a better evaluation score is not the metric grading itself.

Reward hacking is the known failure (DRaFT Sec. 5.3): pair the reward with a regulariser, e.g.
the teacher term with ``objective.teacher_sampler = "lcm"`` and ``teacher_steps = K`` (the squared
distance to the frozen base model's own sample from the same noise).

The scorer is loaded weights-only from a safetensors file whose metadata names its architecture
(``python -m e2ed2.engine.cli.reward_model OUT.safetensors`` writes one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "REWARD_ARCHITECTURE",
    "DigitRewardMLP",
    "digit_log_prob_reward",
    "fit_digit_reward",
    "load_reward_model",
    "save_reward_model",
]

#: The ``architecture`` metadata entry of a digit-reward file (checked on load).
REWARD_ARCHITECTURE = "digit_reward_mlp_v1"
# The digits' native resolution: every input is average-pooled to it first, so one scorer serves
# any data.resolution (bilinear upscaling and average pooling are both smooth, so the reward's
# gradient reaches every pixel of a larger sample).
_POOLED_PX = 8


class DigitRewardMLP(nn.Module):
    """A 2-hidden-layer MLP (GELU) on (B, 1, H, W) digits in [-1, 1], average-pooled to 8x8.

    Deliberately unlike the evaluator's convolutional classifier: no convolutions, no shared
    features, a different input view (pooled pixels).
    """

    def __init__(self, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_POOLED_PX * _POOLED_PX, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(
                "the digit reward scores (B, 1, H, W) grey-scale digits, got shape "
                f"{tuple(images.shape)}"
            )
        return self.net(F.adaptive_avg_pool2d(images, _POOLED_PX))


def digit_log_prob_reward(
    model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per-image reward (B,) float32: the log-probability ``model`` gives the prompted digit.

    Computed in float32 (log-softmax of bf16 logits loses the small probabilities whose
    gradient matters most early in training).
    """
    if labels.shape != (pixels.shape[0],):
        raise ValueError(
            f"labels must be ({pixels.shape[0]},), one digit per image, got {tuple(labels.shape)}"
        )
    dtype = next(model.parameters()).dtype
    logits = model(pixels.to(dtype)).float()
    return logits.log_softmax(-1).gather(1, labels.long().view(-1, 1)).squeeze(1)


def fit_digit_reward(
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 1,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise_std: float = 0.1,
) -> DigitRewardMLP:
    """A :class:`DigitRewardMLP` fitted to ``images`` (N, 1, H, W) in [-1, 1] / ``labels`` (N,),
    frozen and in eval mode. Deterministic for a seed and thread count; the global RNG is left
    untouched.

    Gaussian pixel noise (``noise_std``) augments the data: the scorer then also sees images off
    the data manifold, which is where the sampler's samples start, and its gradient there points
    towards digits rather than being arbitrary.
    """
    if images.dim() != 4 or images.shape[1] != 1 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"fit_digit_reward needs images (N, 1, H, W) and labels (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitRewardMLP()

    def add_noise(batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return batch + noise_std * torch.randn(batch.shape, generator=g)

    return fit_classifier(
        model,
        images.float(),
        labels.long(),
        augment=add_noise,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
    )


_Model = TypeVar("_Model", bound=nn.Module)


def fit_classifier(
    model: _Model,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
) -> _Model:
    """Cross-entropy training of a small image classifier (AdamW, one-cycle LR, shuffled
    mini-batches through ``augment``), deterministic for a seed and thread count; returns it
    frozen in eval mode. Shared by the reward model and the evaluator's digit classifier."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(model(augment(images[rows], g)), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


def save_reward_model(model: DigitRewardMLP, path: str | os.PathLike) -> None:
    """Writes ``model`` as safetensors with its architecture in the metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"architecture": REWARD_ARCHITECTURE, "hidden": str(model.hidden)}
    save_file(state, os.fspath(path), metadata=metadata)


def load_reward_model(path: str | os.PathLike) -> DigitRewardMLP:
    """The frozen digit reward model in ``path`` (safetensors; tensors only, no pickle).

    Every failure names the file: missing, not safetensors, another architecture, or weights
    that do not fit it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"objective.reward_path: no such file {path!r} (write one with "
            "`python -m e2ed2.engine.cli.reward_model OUT.safetensors`)"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"objective.reward_path {path!r} is not a safetensors file: {err}"
        ) from err
    architecture = metadata.get("architecture")
    if architecture != REWARD_ARCHITECTURE:
        raise ValueError(
            f"objective.reward_path {path!r} holds architecture {architecture!r}, expected "
            f"{REWARD_ARCHITECTURE!r} (a digit reward written by e2ed2.engine.cli.reward_model)"
        )
    try:
        model = DigitRewardMLP(hidden=int(metadata.get("hidden", "256")))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"objective.reward_path {path!r}: weights do not fit {REWARD_ARCHITECTURE}: {err}"
        ) from err
    return model.eval().requires_grad_(False)
