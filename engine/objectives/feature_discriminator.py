"""A discriminator on the frozen base denoiser's features (LADD, Sauer et al. 2024, Sec. 3).

``gan.discriminator = "denoiser_features"``: instead of the paper's 4-conv discriminator on
pixels, small trainable heads read the features that a *frozen* copy of the pretrained denoiser
computes for the sample. As in LADD, the sample (real or generated) is first re-noised to a
random timestep ``t`` in ``[gan.feature_t_min, gan.feature_t_max]``::

    x_t = sqrt(acp_t) x + sqrt(1 - acp_t) eps               (the base's own forward process)
    f_b = output of transformer block b of base(x_t, t, text),  b in gan.feature_blocks
    c   = E_t(sinusoid(t)) + E_text(mean of the prompt's text states)

one head per block, the logits of all heads concatenated into one (B, n_blocks * cells) map,
scored by gan.py's losses like the 4-conv map. ``gan.feature_head`` picks the head:

- ``conv`` (default; LADD's heads are small convs over the token grid too): f_b's (N, D) tokens
  laid out on the denoiser's (h, w) patch grid (config sample_size / patch_size), LayerNorm,
  two 3x3 stride-2 convs with GroupNorm and LeakyReLU -> g of (H, h/4, w/4) (the digits base's
  8x8 grid: 2x2), ``logit(cell) = w . g_cell + <g_cell, c> / sqrt(H)``;
- ``token``: each token alone, ``logit(token) = w . h + <h, c> / sqrt(H)``,
  ``h = LeakyReLU(W LayerNorm(f_b token))``, one logit per token.

Both add a projection term conditioned on ``t`` and the prompt (the projection discriminator of
Miyato & Koyama 2018, which LADD's heads use too). The base's features already know the
timestep and the text, and were trained to read noisy samples at every noise level; the heads
are the only trained part.

Why the conv head (measured on the embedded digits, experiments/README.md, issue 25): at the
4-conv discriminator's settings (AdamW 2e-4, 5 updates per step, weight 0.01, t in [0, 500]),
the token heads did not learn in a 300-step run (loss at 2 ln 2 throughout). No wiring fault was
found (the hooks read the blocks' (B, 64, 64) token outputs, the heads get gradients, the
trainer's AdamW steps them, real is the positive). On one batch of 32 real digits against the
base's 16-step DDIM samples (blocks 1 and 3, AdamW 2e-3, BCE after 40 updates, chance 1.39):
token heads 1.27 / 1.36 / 1.41 with t = 0 / t in [0, 250] / [0, 500], conv heads 0.90 / 1.01 /
1.29; after 80 updates the conv heads reach 0.11 (t = 0) and 0.72 ([0, 250]), the token heads
1.17 (t = 0). Scoring each token alone and averaging was the weak part, and re-noising up to 500
drowns most of what is left (block 3 alone, 80 updates: 0.01 / 0.68 / 0.94), hence
``feature_t_max`` 250. Against blurred copies at t = 0 the conv heads reach 0.004 in 40 updates
(token heads 0.44). The 4-conv pixel discriminator: 0.03 on the DDIM batch in 40.

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
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config.gan import GanConfig
from ..config.sampler import SamplerConfig
from ..core.network import Conditioning, denoise

__all__ = ["FeatureDiscriminator", "feature_width", "patch_grid", "transformer_blocks"]

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
    config = cast(Any, network).config  # a diffusers FrozenDict; nn.Module types it as a Tensor
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


class _TokenHead(nn.Module):
    """``feature_head = "token"``: (B, N, D) tokens, (B, H) conditioning -> (B, N) logits, one
    per token, each read alone."""

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


class _ConvHead(nn.Module):
    """``feature_head = "conv"``: the tokens as their (D, h, w) patch grid, read jointly by two
    3x3 stride-2 convs -> (B, cells) logits, one per cell of the last map (8x8 tokens: 2x2).

    (B, N, D) -LayerNorm-> (B, D, h, w) -conv 3x3/2, GroupNorm, LeakyReLU-> (B, H, h/2, w/2)
    -conv 3x3/2, GroupNorm, LeakyReLU-> (B, H, h/4, w/4) = g; logit = conv1x1(g) + <g, c> / sqrt(H)
    per cell (the projection term as in the token head). Grids smaller than 4 stop halving at 1.
    """

    def __init__(self, width: int, hidden: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(width)
        groups = math.gcd(hidden, 8)  # GroupNorm needs groups | channels
        self.body = nn.Sequential(
            nn.Conv2d(width, hidden, 3, stride=2, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.LeakyReLU(0.2),
        )
        self.out = nn.Conv2d(hidden, 1, 1)
        self.scale = hidden**-0.5

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        rows, count, width = tokens.shape
        h, w = self.grid
        if count != h * w:
            raise ValueError(f"{count} tokens do not fill the denoiser's {h} x {w} patch grid")
        # Tokens are row-major over the patch grid (diffusers' PatchEmbed flattens (h, w)).
        grid = self.norm(tokens).transpose(1, 2).reshape(rows, width, h, w)
        g = self.body(grid)
        projection = (g * condition[:, :, None, None]).sum(dim=1) * self.scale
        return (self.out(g).squeeze(1) + projection).flatten(1)


def patch_grid(network: nn.Module) -> tuple[int, int]:
    """The denoiser's token grid (h, w) = sample_size / patch_size (PixArt, SD3, Sana configs)."""
    config = cast(Any, network).config  # a diffusers FrozenDict; nn.Module types it as a Tensor
    size, patch = config.sample_size, config.patch_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(height) // int(patch), int(width) // int(patch)


class FeatureDiscriminator(nn.Module):
    """Trainable heads on the frozen ``base`` denoiser's block outputs (module docstring).

    ``forward(images, cond)``: (B, C, H, W) samples in the denoiser's input space and their
    prompts' :class:`Conditioning` -> (B, n_blocks * cells) logits (cells: the conv head's last
    map, or the tokens for the token head).
    """

    # The frozen base and the schedule are set with object.__setattr__ (kept out of the module's
    # submodules and dtype casts), the counter is a buffer: declared for the type checker.
    _base: nn.Module
    _alphas_cumprod: torch.Tensor
    draws: torch.Tensor

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
        # A DDPM-family scheduler (flow_euler is refused above): it has alphas_cumprod.
        scheduler = cast(Any, sampler.to_diffusers())
        alphas = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        object.__setattr__(self, "_alphas_cumprod", alphas)  # float64, kept out of dtype casts
        width, hidden = feature_width(base), config.head_channels
        self.head_kind = config.feature_head
        if config.feature_head == "conv":
            grid = patch_grid(base)
            self.heads = nn.ModuleList(_ConvHead(width, hidden, grid) for _ in self.block_indices)
        else:
            self.heads = nn.ModuleList(_TokenHead(width, hidden) for _ in self.block_indices)
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
            outputs.append(cast(torch.Tensor, output[-1] if isinstance(output, tuple) else output))

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
        """Logits (B, n_blocks * cells). ``generator``: draw ``t`` and the noise from it instead
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
