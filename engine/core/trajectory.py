"""The differentiable K-step trajectory: noise -> K sampler steps -> final sample, with gradients.

Memory is the whole problem. Plain autograd keeps every activation of all K network calls
(memory ∝ K). The checkpoint policies keep less:

``none``     plain autograd; reference for every other policy.
``step``     each sampler step is one non-reentrant activation-checkpoint region: only its input
             latent (and injected noise) is kept; the step is recomputed during backward. Peak is
             ~one step's activations plus K small latents, at the price of one extra forward
             (FLOPs 4/3 of ``none``).
``block``    ``step`` plus diffusers' per-block checkpointing inside each step's forward and
             recompute: the recompute keeps block inputs plus one block's activations.
``offload``  ``step`` with its kept step inputs on the host (``offload_device``) until recompute.
``block_offload`` per-block checkpointing in one pass, everything the forward keeps for backward
             (each block's inputs, what the net saves outside its blocks) on the host until its
             block's recompute (core/offload.py): ``block``'s device memory at ``step``'s compute
             (FLOPs about 4/3 of ``none``), paid in host memory and copy traffic.
``selective`` ``step`` whose checkpoints keep the outputs of the expensive ops (matmuls and fused
             attention, :data:`SELECTIVE_SAVE_OPS`): the recompute redoes only the elementwise
             ops. Compute ~ ``none``; memory grows with K at the rate of the kept matmul outputs.

Every policy can be cut at its step boundaries for a backward one step at a time (``cuts``,
core/step_cuts.py: no gradient sum of shared weights across the steps).

Truncation (DRaFT / AlignProp): ``full`` through every step run; ``last_k`` through the last
``grad_steps`` steps (earlier ones run without a graph); ``random_k`` through the last k, k drawn
from 1..``grad_steps`` per call. Starts: ``noise`` runs all K steps from Gaussian noise;
``noised_latent`` noises the clean latent to a uniformly drawn step s and runs steps s..K-1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy as SavePolicy
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from ..config.trajectory import CHECKPOINT_POLICIES, CheckpointPolicy, TrajectoryConfig
from .deepspeed_compat import linear_mutates_its_matmul_output as _linear_mutates_its_matmul_output
from .network import Conditioning, step_network, unwrap
from .offload import HostOffload
from .sampler import SamplerSchedule

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

    from .step_cuts import StepCuts  # which builds on this module

__all__ = [
    "CHECKPOINT_POLICIES",
    "SELECTIVE_SAVE_OPS",
    "selective_context_fn",
    "TrajectoryConfig",
    "TrajectoryPlan",
    "Trajectory",
    "run_steps",
]

_aten = torch.ops.aten
# What ``selective`` keeps of each step. Matmuls and fused attention are where a transformer step
# spends nearly all its FLOPs (O(N D^2) and O(N^2 D)), while each output is one (B, N, D)-sized
# tensor (4D for the MLP's first projection; attention keeps its output and logsumexp, never the
# N x N scores). Everything else in a PixArt block (LayerNorm, adaLN modulation, GELU, residual
# adds, reshapes) is elementwise: each intermediate is about as large to keep as a matmul output
# but nearly free to recompute, so it is recomputed. The kept bytes per step are therefore roughly
# the matmul outputs instead of every intermediate, and the recompute costs no matmul FLOPs.
# (Fused Triton attention is not a dispatcher op: under ``model.fused_kernels`` its projections
# are kept and the kernel itself is recomputed.)
SELECTIVE_SAVE_OPS: frozenset = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.convolution.default,  # the patch embedding: a matmul over patches
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)


def _save_expensive_ops(ctx: object, op: object, *args: object, **kwargs: object) -> SavePolicy:
    return SavePolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else SavePolicy.PREFER_RECOMPUTE


def selective_context_fn() -> tuple[object, object]:
    """``context_fn`` for ``torch.utils.checkpoint`` that keeps :data:`SELECTIVE_SAVE_OPS`."""
    return create_selective_checkpoint_contexts(_save_expensive_ops)


@dataclass(frozen=True)
class TrajectoryPlan:
    """The discrete choices of one call: where it starts and where gradients begin."""

    num_steps: int
    start_index: int
    grad_start_index: int

    @property
    def num_grad_steps(self) -> int:
        """How many sampler steps the backward pass runs through."""
        return self.num_steps - self.grad_start_index


def _one_step(
    network: nn.Module,
    schedule: SamplerSchedule,
    cond: Conditioning,
    index: int,
    sample: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    # CFG (sampler.guidance_scale > 1) doubles the batch in here, inside the checkpoint region;
    # the schedule calls the network (SCM preconditions its input and output around the call).
    model_output = schedule.model_output(network, index, sample, cond)
    return schedule.step(index, model_output, sample, noise)


def _checkpointed(fn: Callable, *args: object, context_fn: Callable | None) -> torch.Tensor:
    kwargs: dict[str, Any] = {} if context_fn is None else {"context_fn": context_fn}
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


#: Policies that checkpoint inside each step, per transformer block (diffusers' own switch).
BLOCK_POLICIES: frozenset[str] = frozenset({"block", "block_offload"})


def _set_block_checkpointing(networks: Sequence[nn.Module], enabled: bool) -> None:
    """Per-block checkpointing is model state in diffusers; make it match the policy.

    It must stay set between forward and backward, because the step's recompute runs the model
    again during backward.
    """
    seen: set[int] = set()
    for network in networks:
        model = unwrap(network)
        if id(model) in seen:
            continue
        seen.add(id(model))
        supports = getattr(model, "_supports_gradient_checkpointing", False)
        if enabled:
            if not supports:
                raise ValueError(
                    "trajectory.checkpoint='block' / 'block_offload' needs a denoiser with per-"
                    f"block checkpointing (diffusers enable_gradient_checkpointing); "
                    f"{type(model).__name__} has none"
                )
            diffusers_model = cast("ModelMixin", model)  # it supports per-block checkpointing
            if not diffusers_model.is_gradient_checkpointing:
                diffusers_model.enable_gradient_checkpointing()
        elif supports and cast("ModelMixin", model).is_gradient_checkpointing:
            cast("ModelMixin", model).disable_gradient_checkpointing()


def run_steps(
    networks: nn.Module | Sequence[nn.Module],
    schedule: SamplerSchedule,
    cond: Conditioning,
    sample: torch.Tensor,
    *,
    start_index: int = 0,
    grad_start_index: int | None = None,
    noises: Sequence[torch.Tensor | None] | None = None,
    checkpoint_policy: CheckpointPolicy = "step",
    offload_device: str | torch.device = "cpu",
    context_fn: Callable | None = None,
    cuts: StepCuts | None = None,
) -> torch.Tensor:
    """Runs sampler steps ``start_index..K-1`` from ``sample`` (= x at ``timesteps[start_index]``).

    ``networks``: one shared denoiser, or one per sampler step (indexed by absolute step).
    ``noises[i]``: the noise step ``i`` injects (None where it injects none); drawn by the caller
    so that a recompute sees the same values. ``grad_start_index``: steps before it run without
    a graph (truncated backprop); default ``start_index`` (gradients through every step run).
    ``context_fn``: passed to ``torch.utils.checkpoint`` (selective activation checkpointing).
    ``cuts``: cut the graph at each differentiated step's input after the first (step_cuts.py).
    Returns the final sample with a graph through the differentiated steps.
    """
    num_steps = schedule.num_steps
    if not 0 <= start_index < num_steps:
        raise ValueError(f"start_index {start_index} out of range for {num_steps} steps")
    grad_start_index = start_index if grad_start_index is None else grad_start_index
    if not start_index <= grad_start_index < num_steps:
        raise ValueError(
            f"grad_start_index {grad_start_index} must be in {start_index}..{num_steps - 1}"
        )
    if checkpoint_policy not in CHECKPOINT_POLICIES:
        raise ValueError(
            f"checkpoint_policy={checkpoint_policy!r} is not one of {list(CHECKPOINT_POLICIES)}"
        )
    if isinstance(networks, Sequence | nn.ModuleList) and len(networks) != num_steps:
        raise ValueError(f"got {len(networks)} per-step networks for {num_steps} sampler steps")
    noises = list(noises) if noises is not None else [None] * num_steps
    if len(noises) != num_steps:
        raise ValueError(f"got {len(noises)} noises for {num_steps} sampler steps")

    used = [step_network(networks, i) for i in range(start_index, num_steps)]
    _set_block_checkpointing(used, checkpoint_policy in BLOCK_POLICIES)
    if checkpoint_policy == "selective":
        if context_fn is not None:
            raise ValueError("checkpoint_policy='selective' brings its own context_fn; pass none")
        # The trainer turns memory_efficient_linear off for ``selective``; this catches everyone
        # else (core/deepspeed_compat.py; a module global, so tests can replace it).
        if _linear_mutates_its_matmul_output():
            raise RuntimeError(
                "checkpoint_policy='selective' cannot run while DeepSpeed's ZeRO-3 "
                "memory_efficient_linear has replaced torch.nn.functional.linear (its in-place "
                "bias add corrupts the kept matmul outputs); set "
                '"zero_optimization": {"memory_efficient_linear": false} in the DeepSpeed JSON'
            )
        context_fn = selective_context_fn
    # One offloader per unroll: it copies each saved tensor once, however many blocks save it.
    offload = HostOffload(offload_device) if checkpoint_policy.endswith("offload") else None

    x = sample
    for index in range(start_index, num_steps):
        network = step_network(networks, index)
        noise = noises[index]
        if cuts is not None and index > grad_start_index:
            x = cuts.cut(x)
        if index < grad_start_index:
            with torch.no_grad():
                x = _one_step(network, schedule, cond, index, x, noise)
        elif checkpoint_policy == "none":
            x = _one_step(network, schedule, cond, index, x, noise)
        elif checkpoint_policy == "block_offload":
            assert offload is not None  # built above for both offload policies
            with offload.hooks():
                x = _one_step(network, schedule, cond, index, x, noise)
        elif checkpoint_policy == "offload":
            # Non-reentrant checkpoints save their inputs as saved tensors, outside their own
            # hooks: under ours they are kept on the host until the recompute unpacks them.
            assert offload is not None  # built above for both offload policies
            with offload.hooks():
                x = _checkpointed(
                    _one_step, network, schedule, cond, index, x, noise, context_fn=context_fn
                )
        else:
            x = _checkpointed(
                _one_step, network, schedule, cond, index, x, noise, context_fn=context_fn
            )
    return x


class Trajectory:
    """A configured trajectory over one schedule: draws its start and noise, then runs the steps."""

    def __init__(self, config: TrajectoryConfig, schedule: SamplerSchedule) -> None:
        if schedule.num_steps != config.num_steps:
            raise ValueError(
                f"schedule has {schedule.num_steps} steps, trajectory.num_steps={config.num_steps}"
            )
        self.config = config
        self.schedule = schedule

    def plan(self, generator: torch.Generator | None = None) -> TrajectoryPlan:
        """Draws the start step and the first differentiated step (CPU generator)."""
        num_steps = self.config.num_steps
        start_index = 0
        if self.config.start == "noised_latent":
            start_index = _randint(num_steps, generator)
        remaining = num_steps - start_index
        if self.config.truncation == "full":
            grad_steps = remaining
        elif self.config.truncation == "last_k":
            grad_steps = self.config.grad_steps
        else:
            grad_steps = 1 + _randint(self.config.grad_steps, generator)
        grad_steps = min(grad_steps, remaining)
        return TrajectoryPlan(
            num_steps=num_steps,
            start_index=start_index,
            grad_start_index=num_steps - grad_steps,
        )

    def draw_noise(
        self,
        plan: TrajectoryPlan,
        shape: Sequence[int],
        *,
        clean: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The start sample and the per-step injected noise of one call.

        ``clean`` (the target latent) is needed for ``start='noised_latent'``.
        """
        if clean is not None:
            shape, device, dtype = clean.shape, clean.device, clean.dtype

        def randn() -> torch.Tensor:
            return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

        start_noise = randn()
        if self.config.start == "noised_latent":
            if clean is None:
                raise ValueError("trajectory.start='noised_latent' needs the clean latent")
            start = self.schedule.add_noise(clean, start_noise, plan.start_index)
        else:
            start = start_noise
        noises = [
            randn() if i >= plan.start_index and self.schedule.takes_noise(i) else None
            for i in range(self.config.num_steps)
        ]
        return start, noises

    def draw_noise_per_sample(
        self, plan: TrajectoryPlan, clean: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """:meth:`draw_noise` for each sample ``j`` of ``clean`` from its own ``generators[j]``,
        batched: a sample's noise then depends on its seed only, not on the batch it is in."""
        if len(generators) != clean.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {clean.shape[0]}")
        starts, noises = [], []
        for j, generator in enumerate(generators):
            one = clean[j : j + 1]
            start, step_noise = self.draw_noise(plan, one.shape, clean=one, generator=generator)
            starts.append(start)
            noises.append(step_noise)
        per_step = [
            # One plan: step i has noise for every sample or for none.
            None if noises[0][i] is None else torch.cat([cast(torch.Tensor, n[i]) for n in noises])
            for i in range(self.config.num_steps)
        ]
        return torch.cat(starts), per_step

    def run(
        self,
        networks: nn.Module | Sequence[nn.Module],
        cond: Conditioning,
        start: torch.Tensor,
        noises: Sequence[torch.Tensor | None],
        plan: TrajectoryPlan,
        *,
        context_fn: Callable | None = None,
        cuts: StepCuts | None = None,
    ) -> torch.Tensor:
        """The final sample from a drawn ``start`` and ``noises`` under ``plan``, with the
        configured checkpoint policy (graph through the differentiated steps only)."""
        return run_steps(
            networks,
            self.schedule,
            cond,
            start,
            start_index=plan.start_index,
            grad_start_index=plan.grad_start_index,
            noises=noises,
            checkpoint_policy=self.config.checkpoint,
            offload_device=self.config.offload_device,
            context_fn=context_fn,
            cuts=cuts,
        )

    def __call__(
        self,
        networks: nn.Module | Sequence[nn.Module],
        cond: Conditioning,
        *,
        clean: torch.Tensor | None = None,
        shape: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        plan_generator: torch.Generator | None = None,
        plan: TrajectoryPlan | None = None,
        context_fn: Callable | None = None,
        cuts: StepCuts | None = None,
    ) -> tuple[torch.Tensor, TrajectoryPlan]:
        """Final sample (with graph) and the plan it used: plan, draw, run.

        ``generator`` draws the Gaussian noise (on the latent's device); ``plan_generator`` (CPU)
        draws the start step and truncation.
        """
        if clean is None and shape is None:
            raise ValueError("pass the clean latent or the sample shape")
        plan = plan if plan is not None else self.plan(plan_generator)
        device = None
        if clean is None:
            device = cond.encoder_hidden_states.device
        dtype = clean.dtype if clean is not None else cond.encoder_hidden_states.dtype
        start, noises = self.draw_noise(
            plan,
            shape if shape is not None else cast(torch.Tensor, clean).shape,  # one is given
            clean=clean,
            generator=generator,
            device=device,
            dtype=dtype,
        )
        return self.run(networks, cond, start, noises, plan, context_fn=context_fn, cuts=cuts), plan


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high), drawn on the CPU."""
    return int(torch.randint(high, (1,), generator=generator).item())
