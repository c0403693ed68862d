"""A discriminator on the frozen base denoiser's features (LADD, Sauer et al. 2024, Sec. 3).

``gan.discriminator = "denoiser_features"``: instead of the paper's 4-conv discriminator on
pixels, small trainable heads read the features that a *frozen* copy of the pretrained denoiser
computes for the sample. As in LADD, the sample (real or generated) is first re-noised to a
random timestep ``t`` in ``[gan.feature_t_min, gan.feature_t_max]``::

    x_t = sqrt(acp_t) x + sqrt(1 - acp_t) eps               (the base's own forward process)
    f_b = output of transformer block b of base(x_t, t, text),  b in gan.feature_blocks
    logit(token) = w_b . h + <h, c>,  h = LeakyReLU(W_b LayerNorm(f_b)),
                   c = E_t(sinusoid(t)) + E_text(mean of the prompt's text states)

one head per block (an MLP over tokens with a projection term conditioned on ``t`` and the
prompt, the projection discriminator of Miyato & Koyama 2018, which LADD's heads use too), the
logits of all heads concatenated into one (B, n_blocks * tokens) map, scored by gan.py's losses
like the 4-conv map. The base's features already know the timestep and the text, and were
trained to read noisy samples at every noise level; the heads are the only trained part.
Measured on the embedded digits (experiments/README.md, issue 25) at the 4-conv discriminator's
settings (AdamW 2e-4, 5 updates per step, weight 0.01, t in [0, 500]), these heads did not learn
to separate real from generated digits: their loss stayed at 2 ln 2 for the whole run, and the
generator was the main job's. No wiring fault was found (the hooks read the blocks' (B, 64, 64)
token outputs, the heads get gradients, the trainer's AdamW steps them, real is the positive): on
one batch of 32 digits at t = 0, 40 Adam(W) updates at 2e-3, the heads separate real digits from
blurred copies (loss 0.21) but not from the base's 16-step DDIM samples (1.27; the 4-conv
discriminator 0.03), per-token heads on 2x2 pixel patches fail as well (1.38), while one linear map
over all of block 3's tokens reaches 0.68: scoring each token alone and averaging is the weak part
(and t up to 500 leaves even the blurred copies at 1.27); a head that reads the tokens jointly is
open work.

Frozen base: it is stored as a plain attribute, not a submodule, so ``parameters()`` /
``state_dict()`` (the discriminator's optimizer, DeepSpeed, its checkpoints) see only the heads;
it runs with ``requires_grad=False`` weights, so gradients reach the input sample (the generator
term) but never the base. The trainer passes the teacher's frozen copy when there is one (one
copy in memory for both). Block outputs are read through forward hooks registered for the one
call and removed after it, since the teacher runs the same module.

Randomness: ``t`` and ``eps`` come from a generator seeded by (``seed``, rank, the count of
calls so far); the count is a buffer of the module, so it is checkpointed with the heads and a
resumed run draws what the uninterrupted one would have. Each call draws for its rows only: the
whole batch in one call (the config refuses objective.pixel_rows_per_pass with this
discriminator, since passes of rows would draw other noise than the whole batch).

Hand-written because no library ships a discriminator on a diffusers denoiser's features (LADD's
code is not public); the re-noising is the DDPM forward process of core/sampler.py's schedule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config.gan import GanConfig
from ..config.sampler import SamplerConfig
from ..core.network import Conditioning, denoise

__all__ = ["FeatureDiscriminator", "feature_width", "transformer_blocks"]

TIME_EMBED_DIM = 64  # sinusoid width of the heads' timestep embedding


def transformer_blocks(network: nn.Module) -> nn.ModuleList:
    """The denoiser's sequence of transformer blocks (diffusers' ``transformer_blocks``)."""
    blocks = getattr(network, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(
            f"gan.discriminator='denoiser_features' needs a denoiser with transformer_blocks; "
            f"{type(network).__name__} has none"
        )
    return blocks


def feature_width(network: nn.Module) -> int:
    """Width of a block's output tokens: heads x head width (PixArt, SD3, Sana configs)."""
    config = network.config
    return int(config.num_attention_heads * config.attention_head_dim)


def _timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoids (cos | sin), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _pooled_text(cond: Conditioning) -> torch.Tensor:
    """(B, L, D) text states -> (B, D): the mean over real tokens (the attention mask's 1s)."""
    states = cond.encoder_hidden_states.float()
    mask = cond.encoder_attention_mask
    if mask is None:
        return states.mean(dim=1)
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class _Head(nn.Module):
    """One block's head: (B, N, D) tokens and (B, H) conditioning -> (B, N) logits."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, 1)
        self.scale = hidden**-0.5

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.hidden(self.norm(tokens)), 0.2)
        projection = (h * condition[:, None, :]).sum(dim=-1) * self.scale
        return self.out(h).squeeze(-1) + projection


class FeatureDiscriminator(nn.Module):
    """Trainable heads on the frozen ``base`` denoiser's block outputs (module docstring).

    ``forward(images, cond)``: (B, C, H, W) samples in the denoiser's input space and their
    prompts' :class:`Conditioning` -> (B, n_blocks * tokens) logits.
    """

    def __init__(
        self,
        config: GanConfig,
        base: nn.Module,
        *,
        text_dim: int,
        sampler: SamplerConfig,
        seed: int = 0,
    ) -> None:
        super().__init__()
        blocks = transformer_blocks(base)
        bad = [b for b in config.feature_blocks if b >= len(blocks)]
        if bad:
            raise ValueError(
                f"gan.feature_blocks={list(config.feature_blocks)}: the denoiser has "
                f"{len(blocks)} transformer blocks (indices 0..{len(blocks) - 1}), no {bad}"
            )
        if config.feature_t_max >= sampler.num_train_timesteps:
            raise ValueError(
                f"gan.feature_t_max={config.feature_t_max} must be below "
                f"sampler.num_train_timesteps={sampler.num_train_timesteps}"
            )
        if sampler.kind == "flow_euler":
            raise ValueError(
                "gan.discriminator='denoiser_features' re-noises with the DDPM forward process; "
                "sampler.kind='flow_euler' is not supported"
            )
        # Not a submodule: the heads are all the optimizer, DeepSpeed and checkpoints see.
        object.__setattr__(self, "_base", base.requires_grad_(False).eval())
        self.block_indices = tuple(config.feature_blocks)
        self.t_range = (config.feature_t_min, config.feature_t_max)
        self.seed = seed
        alphas = torch.as_tensor(sampler.to_diffusers().alphas_cumprod, dtype=torch.float64)
        object.__setattr__(self, "_alphas_cumprod", alphas)  # float64, kept out of dtype casts
        width, hidden = feature_width(base), config.head_channels
        self.heads = nn.ModuleList(_Head(width, hidden) for _ in self.block_indices)
        self.time_embed = nn.Linear(TIME_EMBED_DIM, hidden)
        self.text_embed = nn.Linear(text_dim, hidden)
        # Calls so far: the noise generator's counter (checkpointed with the heads).
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    @property
    def base(self) -> nn.Module:
        return self._base

    def _generator(self, device: torch.device) -> torch.Generator:
        rank = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        draw = int(self.draws.item())
        self.draws.add_(1)
        # Distinct seeds per (seed, rank, call); the mix keeps nearby triples apart.
        mixed = (self.seed * 1_000_003 + rank * 7_919 + draw * 104_729) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(mixed)

    def renoise(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` at a random timestep per row: (x_t, t), x_t in the images' dtype."""
        low, high = self.t_range
        t = torch.randint(
            low, high + 1, (images.shape[0],), generator=generator, device=images.device
        )
        noise = torch.randn(
            images.shape, generator=generator, device=images.device, dtype=torch.float32
        )
        acp = self._alphas_cumprod.to(images.device)[t].float().view(-1, 1, 1, 1)
        noisy = acp.sqrt() * images.float() + (1 - acp).sqrt() * noise
        return noisy.to(images.dtype), t

    @contextlib.contextmanager
    def _block_outputs(self) -> Iterator[list[torch.Tensor]]:
        """Collects the chosen blocks' outputs during one base call (hooks removed after)."""
        blocks = transformer_blocks(self._base)
        outputs: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: object, output: object) -> None:
            outputs.append(output[-1] if isinstance(output, tuple) else output)

        handles = [blocks[b].register_forward_hook(keep) for b in self.block_indices]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self,
        images: torch.Tensor,
        cond: Conditioning | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits (B, n_blocks * tokens). ``generator``: draw ``t`` and the noise from it instead
        of the module's counter-seeded one (tests)."""
        if cond is None:
            raise ValueError(
                "gan.discriminator='denoiser_features' scores samples with their prompts: pass "
                "the batch's Conditioning"
            )
        if cond.encoder_hidden_states.shape[0] != images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} samples but {cond.encoder_hidden_states.shape[0]} prompts"
            )
        if generator is None:
            generator = self._generator(images.device)
        noisy, t = self.renoise(images, generator)
        base_dtype = next(self._base.parameters()).dtype
        with self._block_outputs() as features:
            # Unguided (guidance 1): the conditional call alone; gradients reach `images` only.
            denoise(self._base, noisy.to(base_dtype), t, cond.to(images.device, base_dtype))
        dtype = self.time_embed.weight.dtype
        condition = self.time_embed(_timestep_embedding(t).to(dtype)) + self.text_embed(
            _pooled_text(cond).to(dtype)
        )
        logits: Sequence[torch.Tensor] = [
            head(tokens.to(dtype), condition)
            for head, tokens in zip(self.heads, features, strict=True)
        ]
        return torch.cat(list(logits), dim=1)
