"""Training objectives: the E2ED2 reconstruction loss on the final sample, and the standard loss.

``kind='e2ed2'`` (paper Sec. 3.2): the trajectory runs the K-step sampler with gradients and the
loss sits on its final sample only (eq. 7)::

    L = w_l1 * |ẑ0 - z0|_1 + w_l2 * |ẑ0 - z0|_2^2 + w_lpips * LPIPS(D(ẑ0), D(z0))

L1 and L2 compare latents; LPIPS compares VAE-decoded pixels (``D`` = the frozen decoder). The
sample's decode stays in the graph (activation-checkpointed by default: only the latent is kept,
the decoder is re-run in backward); the target's decode runs without a graph. The GAN term of eq. 8
lives in :mod:`e2ed2.engine.objectives.gan` and uses the same decoded pixels, so decode once::

    fake_px = loss_fn.decode_sample(z_hat)      # in the graph (checkpointed)
    real_px = loss_fn.decode_target(z0)         # no graph; also the discriminator's positives
    terms = loss_fn(z_hat, z0, sample_pixels=fake_px, target_pixels=real_px)

``kind='diffusion'`` (eqs. 3/6): one random timestep per sample, the noised latent, and the MSE
between the network's prediction and its epsilon / v / x0 target — :func:`diffusion_loss`, so the
same engine pretrains baselines. Flow matching (``sampler.kind='flow_euler'``, SD3): a random
sigma of the training grid, x_sigma = (1 - sigma) x0 + sigma eps, and the MSE of the predicted
velocity against eps - x0 (rectified flow, Esser et al. 2024 eq. 2 with uniform weighting).

With the start noise independent of the target, L1 / L2 / LPIPS to the data are minimised by the
per-prompt mean (median) image. Two well-posed terms fix that, mixable with the others by weight:
``energy`` (a strictly proper scoring rule over m samples per prompt, :mod:`.energy`) and
``teacher`` (a target paired with the start noise: a frozen teacher's many-step sample from the
same noise, :mod:`.teacher`); ``reward`` maximises a frozen differentiable scorer of the decoded
sample (DRaFT / AlignProp: a digit classifier, :mod:`.reward`, or CLIP similarity to the caption,
:mod:`.clip_reward`). The seam is :meth:`E2ED2Loss.forward`: the final samples of the
unroll (m per prompt), the data target, and what the frozen helpers produced (decoded pixels,
the teacher's sample); it returns named terms and their weighted ``total``. A new term is a
module here plus its fields in ``config/objective.py``.

Default weights are L2 only (``l2_weight=1``, ``lpips_weight=0``): right for the embedded
pixel-space default, which has no LPIPS backbone on disk. The paper's best mix is L2 + LPIPS
(App. D.1); presets for real models set ``lpips_weight`` and ``lpips_backbone_path``.

Size: over 400 lines because it holds both objectives of ``objective.kind``: the E2ED2 terms on
the final sample and the standard one-step loss (epsilon / v / x0 targets and flow matching's
velocity), which share the sampler config and the network seam.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.objective import LPIPS_MIN_SIZE_PX, TORCHVISION_MODELS, ObjectiveConfig
from ..config.sampler import SamplerConfig
from ..core.models import FrozenVAE
from ..core.network import Conditioning, denoise
from ..core.step_cuts import loss_in_row_passes, row_slices
from .clip_reward import ClipReward
from .energy import energy_score
from .reward import digit_log_prob_reward, load_reward_model

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from diffusers.schedulers.scheduling_lcm import LCMScheduler
    from lpips import LPIPS

__all__ = [
    "LPIPS_MIN_SIZE_PX",
    "E2ED2Loss",
    "ObjectiveConfig",
    "PassedTerms",
    "build_lpips",
    "diffusion_input_and_target",
    "diffusion_loss",
    "load_lpips_backbone",
    "load_loss_decoder",
]

logger = logging.getLogger(__name__)

Decode = Callable[[torch.Tensor], torch.Tensor]


# --- LPIPS --------------------------------------------------------------------------------------


def load_lpips_backbone(lpips_model: LPIPS, path: str | os.PathLike) -> None:
    """Loads a torchvision state dict's ``features.*`` weights into an ``lpips.LPIPS`` backbone.

    The lpips package slices torchvision's ``features`` into ``slice1..sliceN`` keeping each
    layer's index as its name, so ``net.slice2.5.weight`` is torchvision's ``features.5.weight``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS backbone weights not found: {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(
            f"LPIPS backbone file {path!r} holds a {type(state).__name__}, not a state dict"
        )
    backbone = lpips_model.net
    ours = backbone.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, tensor in ours.items():
        _slice, index, rest = key.split(".", 2)
        source = f"features.{index}.{rest}"
        if source not in state:
            missing.append(source)
            continue
        if tuple(state[source].shape) != tuple(tensor.shape):
            raise ValueError(
                f"LPIPS backbone file {path!r}: {source} has shape {tuple(state[source].shape)}, "
                f"expected {tuple(tensor.shape)} ({lpips_model.pnet_type} backbone)"
            )
        mapped[key] = state[source]
    if missing:
        raise ValueError(
            f"LPIPS backbone file {path!r} lacks {len(missing)} of the {len(ours)} "
            f"{lpips_model.pnet_type} backbone tensors (e.g. {missing[0]!r}); expected a torchvision "
            f"{TORCHVISION_MODELS[lpips_model.pnet_type]} state dict"
        )
    backbone.load_state_dict(mapped, strict=True)


def build_lpips(config: ObjectiveConfig) -> LPIPS:
    """The frozen ``lpips.LPIPS`` network of ``config``, without any download.

    The linear heads come from the ``lpips`` package's own files (``pretrained=True``); the
    backbone is built random (``pnet_rand=True``, so torchvision downloads nothing) and then
    loaded from ``lpips_backbone_path``, unless ``lpips_random_backbone``.
    """
    # lazy: lpips adds ~2 s over torch; only objective.lpips_weight > 0 needs it
    import lpips

    if config.lpips_backbone_path is None and not config.lpips_random_backbone:
        raise ValueError(
            "objective.lpips_backbone_path or objective.lpips_random_backbone=true is required to "
            "build LPIPS"
        )
    if config.lpips_backbone_path is not None and not os.path.isfile(config.lpips_backbone_path):
        raise FileNotFoundError(
            f"objective.lpips_backbone_path: no such file {config.lpips_backbone_path!r}"
        )
    with warnings.catch_warnings():
        # lpips 0.1.4 calls torchvision's deprecated ``pretrained=`` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(
            net=config.lpips_net, pretrained=True, pnet_rand=True, verbose=False, eval_mode=True
        )
    if config.lpips_backbone_path is not None:
        load_lpips_backbone(model, config.lpips_backbone_path)
    else:
        logger.warning(
            "objective.lpips_random_backbone=true: LPIPS uses a randomly initialised %s backbone; "
            "the distance is not perceptual (meant for tests and tiny presets)",
            config.lpips_net,
        )
    model.requires_grad_(False)
    return model.eval()


def load_loss_decoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> FrozenVAE:
    """The frozen ``objective.loss_decoder_path``: a local diffusers ``AutoencoderTiny`` folder
    (``config.json`` + weights), decoding scaled latents as the pipelines do (``FrozenVAE``)."""
    folder = os.fspath(path)
    key = "objective.loss_decoder_path"
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{key}={folder!r} has no config.json; expected a diffusers AutoencoderTiny folder "
            "saved with save_pretrained (e.g. a local copy of madebyollin/taesd)"
        )
    with open(config_file, encoding="utf-8") as handle:
        class_name = json.load(handle).get("_class_name")
    if class_name != "AutoencoderTiny":
        raise ValueError(
            f"{key}={folder!r} holds a {class_name!r}, not a diffusers AutoencoderTiny (the loss "
            "decoder is meant to be the small one; the full VAE is model.vae_path)"
        )
    # lazy: diffusers adds ~3 s over torch; only the tiny-decoder pixel term needs it
    from diffusers import AutoencoderTiny

    return FrozenVAE(AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype))


def enable_block_checkpointing(vae: ModelMixin) -> bool:
    """Turns on diffusers' own gradient checkpointing of an ``AutoencoderKL``'s decoder, which
    checkpoints its mid block and each up block separately; False (nothing changed) for a
    decoder without per-block checkpoints (``AutoencoderTiny`` checkpoints all its layers as
    one, which ``decode_checkpoint`` already does)."""
    inner = getattr(vae, "decoder", None)
    if inner is None or not hasattr(inner, "up_blocks") or not hasattr(inner, "mid_block"):
        return False
    if not hasattr(inner, "gradient_checkpointing"):
        return False
    vae.enable_gradient_checkpointing()  # also flags the encoder, which runs without grad here
    return True


def _as_rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{what} must be (B, 1 or 3, H, W) pixels, got shape {tuple(images.shape)}"
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# --- E2ED2 ------------------------------------------------------------------------------------------


@dataclass
class PassedTerms:
    """What :meth:`E2ED2Loss.terms_in_passes` returns."""

    loss: torch.Tensor
    """Backpropagate this (alone): the latent terms with their graph plus the pixel terms'
    surrogate ``<sample, dL_pixels/dsample>``. Its value is not the loss (see ``terms``)."""
    terms: dict[str, torch.Tensor]
    """Every term's batch mean (detached float32) and their weighted ``total``, as
    :meth:`E2ED2Loss.forward` names them, plus ``adversarial`` when one was given."""
    sample_pixels: torch.Tensor | None = None
    """The decoded samples of every pass, detached (``keep_pixels``): the discriminator's
    negatives."""
    target_pixels: torch.Tensor | None = None
    """The decoded targets of every pass (``keep_pixels``): the discriminator's positives."""


class E2ED2Loss(nn.Module):
    """The reconstruction loss of eq. 7 on the trajectory's final sample, as named terms.

    ``decode``: frozen decoder from latents (B, C, h, w) to pixels (B, 3 or 1, H, W) in [-1, 1],
    e.g. ``lambda z: vae.decode(z / vae.config.scaling_factor).sample``; None = pixel space (the
    latents are the pixels). Only needed for LPIPS (and for the GAN's pixels).

    The LPIPS network is frozen, in eval mode, and deliberately not a registered submodule: this
    module has no parameters and no state dict entries, so an optimizer, DeepSpeed or a checkpoint
    built from ``.parameters()`` / ``.state_dict()`` never sees it. ``.to()`` / ``.cuda()`` /
    ``.half()`` still move it. The ``decode`` callable is the trainer's (it moves the VAE itself).
    """

    # Set with object.__setattr__ in __init__ (plain attributes, not submodules).
    _lpips: LPIPS | None
    _reward: nn.Module | None
    _loss_decoder: FrozenVAE | None
    _decode: Decode | None

    def __init__(
        self,
        config: ObjectiveConfig,
        decode: Decode | None = None,
        *,
        reward_dtype: torch.dtype = torch.float32,
        decoder: ModelMixin | None = None,
        pixels_per_latent: int | None = None,
    ) -> None:
        """``reward_dtype``: the weights' dtype of a CLIP reward model and of the loss decoder
        (the run's compute dtype; the digit reward stays float32). ``decoder``: the diffusers
        autoencoder behind ``decode``, whose decoder blocks are checkpointed one by one
        (``decode_checkpoint_blocks``). ``pixels_per_latent``: pixels per latent cell
        (``pixel_crop``; default 8 with a decoder, 1 in pixel space)."""
        super().__init__()
        if config.kind != "e2ed2":
            raise ValueError(
                f"E2ED2Loss needs objective.kind='e2ed2', got {config.kind!r}; use diffusion_loss"
            )
        self.config = config
        # The optimizer step the weights are read at (objective.energy_weight_schedule).
        self.step = 0
        # Plain attributes, not submodules (see the class docstring).
        object.__setattr__(self, "_lpips", build_lpips(config) if config.lpips_weight > 0 else None)
        reward: nn.Module | None = None
        # ObjectiveConfig rejects reward_weight > 0 without a reward_path.
        if config.reward_weight > 0 and config.reward_kind == "clip":
            reward = ClipReward.from_folder(cast(str, config.reward_path), dtype=reward_dtype)
        elif config.reward_weight > 0:
            reward = load_reward_model(cast(str, config.reward_path))
        object.__setattr__(self, "_reward", reward)
        loss_decoder: FrozenVAE | None = None
        if config.loss_decoder_path is not None and decode is None:
            raise ValueError(
                "objective.loss_decoder_path is set but the run is in pixel space (no decoder "
                "to replace); unset it"
            )
        if config.loss_decoder_path is not None:
            loss_decoder = load_loss_decoder(config.loss_decoder_path, reward_dtype)
            decode = loss_decoder.decode
            decoder = None
        object.__setattr__(self, "_loss_decoder", loss_decoder)
        object.__setattr__(self, "_decode", decode)
        # Per-block checkpoints inside the decoder replace the whole-decoder checkpoint.
        self._blocks_checkpointed = bool(
            config.decode_checkpoint
            and config.decode_checkpoint_blocks
            and decoder is not None
            and enable_block_checkpointing(decoder)
        )
        self.pixels_per_latent = pixels_per_latent or (1 if decode is None else 8)

    @property
    def lpips_network(self) -> nn.Module | None:
        """The frozen ``lpips.LPIPS`` module (None when ``lpips_weight`` is 0)."""
        return self._lpips

    @property
    def reward_model(self) -> nn.Module | None:
        """The frozen reward model (None when ``reward_weight`` is 0)."""
        return self._reward

    @property
    def needs_pixels(self) -> bool:
        """Whether :meth:`forward` uses decoded pixels (LPIPS, reward, pixel-space energy)."""
        return self.config.needs_pixels

    @property
    def needs_labels(self) -> bool:
        """Whether :meth:`forward` needs ``labels`` (the digit reward)."""
        return self.config.needs_labels

    @property
    def needs_captions(self) -> bool:
        """Whether :meth:`forward` needs ``captions`` (the CLIP reward)."""
        return self.config.needs_captions

    def _apply(self, fn: Callable, recurse: bool = True) -> E2ED2Loss:
        super()._apply(fn, recurse)
        for frozen in (self._lpips, self._reward, self._loss_decoder):
            if frozen is not None:
                frozen._apply(fn)
        return self

    def train(self, mode: bool = True) -> E2ED2Loss:
        super().train(mode)  # the frozen networks are not children: they stay in eval mode
        return self

    def decode_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Pixels of the generated latent, in the graph (checkpointed if ``decode_checkpoint``:
        the decoder's blocks one by one, or the decoder as a whole). The loss decoder
        (``loss_decoder_path``) when there is one."""
        if self._decode is None:
            return sample
        whole = self.config.decode_checkpoint and not self._blocks_checkpointed
        if whole and torch.is_grad_enabled() and sample.requires_grad:
            return checkpoint(self._decode, sample, use_reentrant=False)
        return self._decode(sample)

    def draw_crops(
        self,
        rows: int,
        latent_size: tuple[int, int],
        seed: int,
        samples_per_prompt: int = 1,
    ) -> list[tuple[int, int]] | None:
        """``pixel_crop``'s top-left corners in latent cells, one ``(top, left)`` per row and
        the same for a prompt's m rows; None without a crop. Drawn from ``seed`` alone (the
        trainer derives it from the run seed, step, micro-step and rank, so a resumed run draws
        the same crops), in Python: plain integers also under ``FakeTensorMode``."""
        if not self.config.pixel_crop:
            return None
        cells = self.config.pixel_crop // self.pixels_per_latent
        height, width = latent_size
        if cells < 1 or cells > min(height, width):
            raise ValueError(
                f"objective.pixel_crop={self.config.pixel_crop} does not fit the "
                f"{height * self.pixels_per_latent}x{width * self.pixels_per_latent} px image "
                f"({self.pixels_per_latent} px per latent cell)"
            )
        rng = random.Random(seed)
        corners = []
        for _ in range(rows // samples_per_prompt):
            corner = (rng.randrange(height - cells + 1), rng.randrange(width - cells + 1))
            corners.extend([corner] * samples_per_prompt)
        return corners

    def crop(
        self, latents: torch.Tensor, corners: Sequence[tuple[int, int]] | None
    ) -> torch.Tensor:
        """Each row's ``pixel_crop`` square of latents (differentiable); ``corners`` None: all."""
        if corners is None:
            return latents
        if len(corners) != latents.shape[0]:
            raise ValueError(f"{len(corners)} crop corners for {latents.shape[0]} rows")
        cells = self.config.pixel_crop // self.pixels_per_latent
        return torch.stack(
            [
                row[:, top : top + cells, left : left + cells]
                for row, (top, left) in zip(latents, corners, strict=True)
            ]
        )

    def decode_target(self, target: torch.Tensor) -> torch.Tensor:
        """Pixels of the ground-truth latent, without a graph."""
        with torch.no_grad():
            return target.detach() if self._decode is None else self._decode(target)

    def lpips_distance(
        self, sample_pixels: torch.Tensor, target_pixels: torch.Tensor
    ) -> torch.Tensor:
        """Batch mean of LPIPS(sample, target) (eq. 7's perceptual metric); 1-channel -> RGB."""
        if self._lpips is None:
            raise ValueError("objective.lpips_weight is 0: this loss has no LPIPS network")
        if sample_pixels.shape != target_pixels.shape:
            raise ValueError(
                f"sample pixels {tuple(sample_pixels.shape)} != target pixels "
                f"{tuple(target_pixels.shape)}"
            )
        a = _as_rgb(sample_pixels, "sample pixels")
        b = _as_rgb(target_pixels, "target pixels")
        side = self.config.lpips_resolution
        if side and min(a.shape[-2:]) > side:
            # Shorter side to lpips_resolution, aspect kept; antialiased as an image resize is.
            scale = side / min(a.shape[-2:])
            size = (round(a.shape[-2] * scale), round(a.shape[-1] * scale))
            a = F.interpolate(a, size=size, mode="bilinear", antialias=True, align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", antialias=True, align_corners=False)
        min_px = LPIPS_MIN_SIZE_PX[self.config.lpips_net]
        if min(a.shape[-2:]) < min_px:
            raise ValueError(
                f"LPIPS with objective.lpips_net={self.config.lpips_net!r} needs images of at least "
                f"{min_px}x{min_px} pixels, got {a.shape[-2]}x{a.shape[-1]}"
            )
        dtype = self._lpips.scaling_layer.shift.dtype
        a, b = a.to(dtype), b.to(dtype)
        if self.config.lpips_checkpoint and torch.is_grad_enabled() and a.requires_grad:
            per_image = checkpoint(self._lpips, a, b, use_reentrant=False)
        else:
            per_image = self._lpips(a, b)
        return per_image.mean()

    def forward(
        self,
        sample: torch.Tensor,
        target: torch.Tensor,
        *,
        sample_pixels: torch.Tensor | None = None,
        target_pixels: torch.Tensor | None = None,
        samples_per_prompt: int = 1,
        teacher_sample: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
        crops: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The enabled terms (``l1``, ``l2``, ``lpips``, ``energy``, ``teacher``, ``reward``) and
        their weighted sum ``"total"``, each the unweighted batch mean (float32).

        ``sample``: the final latents ẑ0 (B·m, C, h, w) with their graph, grouped by prompt (rows
        ``i·m .. i·m+m-1`` share prompt i, m = ``samples_per_prompt``); ``target``: the data z0 of
        each row (B·m, ...; prompt i's latent repeated m times). L1/L2 (eq. 7) compare latents;
        LPIPS compares pixels (pass ``sample_pixels`` / ``target_pixels`` when already decoded,
        e.g. shared with the GAN term, else they are decoded here). ``energy`` scores each
        prompt's m samples against its target (objectives/energy.py); ``teacher`` is the squared
        L2 to ``teacher_sample``, the frozen teacher's sample from the same start noise
        (objectives/teacher.py); ``reward`` is minus the mean reward of the sample's pixels for
        its prompt: ``labels`` (B·m,) the prompted digit of each row (reward_kind "digit",
        objectives/reward.py) or ``captions`` (B·m strings) its caption ("clip",
        objectives/clip_reward.py). ``crops``: :meth:`draw_crops`'s corners (``pixel_crop``),
        applied to the latents before they are decoded here.
        """
        self._check_rows(sample, target, samples_per_prompt)
        terms = self.latent_terms(
            sample, target, samples_per_prompt=samples_per_prompt, teacher_sample=teacher_sample
        )
        if self.needs_pixels:
            if sample_pixels is None:
                sample_pixels = self.decode_sample(self.crop(sample, crops))
            if target_pixels is None:
                target_pixels = self.decode_target(self.crop(target, crops))
            terms.update(
                self.pixel_terms(
                    sample_pixels,
                    target_pixels,
                    samples_per_prompt=samples_per_prompt,
                    labels=labels,
                    captions=captions,
                )
            )
        weights = self.step_weights()
        terms = {name: terms[name] for name in weights}  # the config's order
        # Never the empty sum's int 0: ObjectiveConfig needs a positive weight for kind='e2ed2'.
        terms["total"] = cast(torch.Tensor, sum(weights[name] * terms[name] for name in weights))
        return terms

    def set_step(self, step: int) -> None:
        """The 0-based optimizer step the next losses belong to (the weights' schedules)."""
        self.step = step

    def step_weights(self) -> dict[str, float]:
        """The positive weights of :attr:`config` by term name at :attr:`step`: the energy
        score's times its schedule's factor (``objective.energy_weight_schedule``)."""
        weights = dict(self.config.weights)
        if "energy" in weights:
            weights["energy"] *= self.config.energy_factors.factor(self.step)
        return weights

    @staticmethod
    def _check_rows(sample: torch.Tensor, target: torch.Tensor, samples_per_prompt: int) -> None:
        if sample.shape != target.shape:
            raise ValueError(
                f"sample {tuple(sample.shape)} and target {tuple(target.shape)} differ in shape"
            )
        if sample.shape[0] % samples_per_prompt:
            raise ValueError(
                f"a batch of {sample.shape[0]} samples is not a multiple of "
                f"samples_per_prompt={samples_per_prompt}"
            )

    @property
    def _pixel_energy(self) -> bool:
        return "energy" in self.config.weights and self.config.energy_space == "pixels"

    def latent_terms(
        self,
        sample: torch.Tensor,
        target: torch.Tensor,
        *,
        samples_per_prompt: int = 1,
        teacher_sample: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The enabled terms on latents (``l1``, ``l2``, latent ``energy``, ``teacher``),
        unweighted batch means; see :meth:`forward`."""
        terms: dict[str, torch.Tensor] = {}
        weights = self.config.weights
        if "l1" in weights:
            terms["l1"] = F.l1_loss(sample.float(), target.float())
        if "l2" in weights:
            terms["l2"] = F.mse_loss(sample.float(), target.float())
        if "energy" in weights and not self._pixel_energy:
            terms["energy"] = self._energy(sample, target, samples_per_prompt)
        if "teacher" in weights:
            if teacher_sample is None:
                raise ValueError("objective.teacher_weight > 0 but no teacher sample was given")
            terms["teacher"] = F.mse_loss(sample.float(), teacher_sample.float())
        return terms

    def _energy(self, samples: torch.Tensor, targets: torch.Tensor, m: int) -> torch.Tensor:
        grouped = samples.reshape(-1, m, *samples.shape[1:])
        return energy_score(
            grouped, targets[::m], beta=self.config.energy_beta, lam=self.config.energy_lambda
        )

    def pixel_terms(
        self,
        sample_pixels: torch.Tensor,
        target_pixels: torch.Tensor,
        *,
        samples_per_prompt: int = 1,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The enabled terms on decoded pixels (``lpips``, pixel ``energy``, ``reward``),
        unweighted means over the given rows (whole prompts); see :meth:`forward`."""
        terms: dict[str, torch.Tensor] = {}
        weights = self.config.weights
        if "lpips" in weights:
            terms["lpips"] = self.lpips_distance(sample_pixels, target_pixels)
        if self._pixel_energy:
            terms["energy"] = self._energy(sample_pixels, target_pixels, samples_per_prompt)
        if "reward" in weights and self.config.reward_kind == "clip":
            if captions is None:
                raise ValueError(
                    "objective.reward_kind='clip' but no captions were given (the caption of "
                    "each sample)"
                )
            checkpointed = self.config.reward_checkpoint
            rewards = self._reward_network()(sample_pixels, captions, checkpointed=checkpointed)
            terms["reward"] = -rewards.mean()
        elif "reward" in weights:
            if labels is None:
                raise ValueError(
                    "objective.reward_weight > 0 but no labels were given (the prompted digit of "
                    "each sample)"
                )
            reward = self._reward_network()
            terms["reward"] = -digit_log_prob_reward(reward, sample_pixels, labels).mean()
        return terms

    def _reward_network(self) -> nn.Module:
        if self._reward is None:  # built whenever "reward" is in the config's weights
            raise ValueError("objective.reward_weight is 0: this loss has no reward model")
        return self._reward

    def terms_in_passes(
        self,
        sample: torch.Tensor,
        target: torch.Tensor,
        *,
        samples_per_prompt: int = 1,
        teacher_sample: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
        crops: Sequence[tuple[int, int]] | None = None,
        adversarial: Callable[[torch.Tensor], torch.Tensor] | None = None,
        adversarial_weight: float = 0.0,
        keep_pixels: bool = False,
    ) -> PassedTerms:
        """:meth:`forward`'s terms (plus eq. 8's ``adversarial(sample_pixels)`` with its weight,
        the GAN generator term) with the pixel terms in passes of ``pixel_rows_per_pass`` rows.

        Every pixel term is a mean over rows (over prompts for the energy score, whose m samples
        share a pass), so the batch's term is the passes' terms weighted by their share of the
        rows. Each pass decodes its rows from the final latent cut from the unroll's graph,
        computes its terms, and backpropagates them to that cut (core/step_cuts.py
        :func:`~e2ed2.engine.core.step_cuts.loss_in_row_passes`) before the next pass is decoded:
        the decoder's, LPIPS's, CLIP's and the discriminator's activations exist for one pass at
        a time. Backpropagate ``loss`` afterwards (the unroll's backward, in one piece or cut).
        """
        self._check_rows(sample, target, samples_per_prompt)
        m = samples_per_prompt
        rows = sample.shape[0]
        weights = self.step_weights()
        if adversarial is not None:
            weights["adversarial"] = adversarial_weight
        latent = self.latent_terms(
            sample, target, samples_per_prompt=m, teacher_sample=teacher_sample
        )
        values = {name: term.detach().float() for name, term in latent.items()}
        kept: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

        def pass_loss(pass_sample: torch.Tensor, where: slice) -> torch.Tensor:
            share = (where.stop - where.start) / rows
            corners = None if crops is None else crops[where]
            fake = self.decode_sample(self.crop(pass_sample, corners))
            real = self.decode_target(self.crop(target[where], corners))
            terms = self.pixel_terms(
                fake,
                real,
                samples_per_prompt=m,
                labels=None if labels is None else labels[where],
                captions=None if captions is None else captions[where],
            )
            if adversarial is not None:
                terms["adversarial"] = adversarial(fake)
            if keep_pixels:
                kept[0].append(fake.detach())
                kept[1].append(real)
            for name, term in terms.items():
                values[name] = values.get(name, 0.0) + share * term.detach().float()
            start = torch.zeros((), device=pass_sample.device)
            return share * sum((weights[name] * term for name, term in terms.items()), start)

        group = m if self._pixel_energy else 1
        slices = row_slices(rows, self.config.pixel_rows_per_pass, group)
        loss = loss_in_row_passes(sample, slices, pass_loss)
        if latent:
            loss = loss + sum(weights[name] * term for name, term in latent.items())
        terms = {name: values[name] for name in weights}
        # Never the empty sum's int 0 (see forward).
        terms["total"] = cast(torch.Tensor, sum(weights[name] * terms[name] for name in weights))
        fake_px, real_px = (torch.cat(kept[0]), torch.cat(kept[1])) if keep_pixels else (None, None)
        return PassedTerms(loss, terms, fake_px, real_px)

    def extra_repr(self) -> str:
        lpips = f", lpips_net={self.config.lpips_net!r}" if self._lpips is not None else ""
        space = "pixel space" if self._decode is None else "decoded"
        return f"weights={self.config.weights}{lpips}, {space}"


# --- standard diffusion loss ------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _alphas_cumprod(config: SamplerConfig) -> torch.Tensor:
    # The beta-schedule samplers' scheduler: flow_euler's callers take _flow_training_grid.
    scheduler = cast("DDIMScheduler | LCMScheduler", config.to_diffusers())
    return scheduler.alphas_cumprod.to(torch.float32)  # (T,), CPU


def diffusion_input_and_target(
    sampler_config: SamplerConfig,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised input x_t (forward process, eq. 1/4) and the regression target of eq. 3/6.

    ``timesteps``: (B,) integers in 0..T-1, one per sample. With ``a = alphas_cumprod[t]``:
    ``x_t = sqrt(a) * x0 + sqrt(1-a) * eps``; the target is ``eps`` (epsilon),
    ``sqrt(a) * eps - sqrt(1-a) * x0`` (v_prediction, as diffusers' ``get_velocity``) or ``x0``
    (sample). Coefficients are computed in float32 and cast to ``clean``'s dtype. Flow matching:
    ``t`` indexes the scheduler's training sigmas, ``x_t = (1 - sigma) * x0 + sigma * eps`` and
    the target is the velocity ``eps - x0``.
    """
    if noise.shape != clean.shape:
        raise ValueError(f"noise {tuple(noise.shape)} != clean {tuple(clean.shape)}")
    if timesteps.shape != (clean.shape[0],):
        raise ValueError(
            f"timesteps must be ({clean.shape[0]},), one per sample, got {tuple(timesteps.shape)}"
        )
    view = (-1,) + (1,) * (clean.dim() - 1)
    if sampler_config.kind == "flow_euler":
        # ``timesteps`` index the training grid; sigma = sigmas[index] (diffusers' scale_noise).
        sigmas = _flow_training_grid(sampler_config)[0].to(clean.device)
        sigma = sigmas[timesteps.to(clean.device)].view(view).to(clean.dtype)
        return sigma * noise + (1.0 - sigma) * clean, noise - clean
    acp = _alphas_cumprod(sampler_config).to(clean.device)[timesteps.to(clean.device)]
    a = acp.sqrt().view(view).to(clean.dtype)
    b = (1 - acp).sqrt().view(view).to(clean.dtype)
    noisy = a * clean + b * noise
    kind = sampler_config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = a * noise - b * clean
    else:
        target = clean
    return noisy, target


def diffusion_loss(
    network: nn.Module,
    clean: torch.Tensor,
    cond: Conditioning,
    sampler_config: SamplerConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The standard single-step denoising loss (eq. 3, in latent space eq. 6), a batch mean.

    Per sample: ``t ~ U{0..T-1}`` (T = ``num_train_timesteps``), ``eps ~ N(0, I)``, then the MSE
    between ``denoise(network, x_t, t)`` and the target of ``sampler_config.prediction_type``
    (:func:`diffusion_input_and_target`). Draw order: timesteps, then noise, both from
    ``generator``, which must live on ``clean``'s device. Flow matching: ``t`` is an index into
    the (shifted) training sigmas and the network sees the float timestep ``sigma * T`` of it, as
    diffusers' SD3 training scripts with uniform weighting.
    """
    batch = clean.shape[0]
    num_timesteps = sampler_config.num_train_timesteps
    timesteps = torch.randint(
        0, num_timesteps, (batch,), generator=generator, device=clean.device, dtype=torch.long
    )
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    noisy, target = diffusion_input_and_target(sampler_config, clean, noise, timesteps)
    model_timesteps = timesteps
    if sampler_config.kind == "flow_euler":
        model_timesteps = _flow_training_grid(sampler_config)[1].to(clean.device)[timesteps]
    prediction = denoise(network, noisy, model_timesteps, cond)
    return F.mse_loss(prediction.float(), target.float())


@functools.lru_cache(maxsize=8)
def _flow_training_grid(config: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow matching's training sigmas and their float timesteps ``sigma * T``, (T,) float32 on
    the CPU, from sigma = 1 down to 1/T: ``FlowMatchEulerDiscreteScheduler`` before
    ``set_timesteps`` (shifted by ``shift``; unshifted with dynamic shifting, as diffusers)."""
    # Called only for sampler.kind='flow_euler', whose scheduler this is.
    scheduler = cast("FlowMatchEulerDiscreteScheduler", config.to_diffusers())
    # diffusers builds ``timesteps`` in a local first bound to a numpy array and then rebound to
    # a tensor; mypy types the attribute by that first binding (it is a tensor).
    return (
        scheduler.sigmas.to(torch.float32),
        scheduler.timesteps.to(torch.float32),  # type: ignore[attr-defined]
    )
