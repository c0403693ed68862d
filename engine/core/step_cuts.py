"""The unroll's graph cut for a backward in pieces: at every sampler step, between row passes.

With one network shared by the K steps, a single backward through the unroll sums each
parameter's K gradient contributions in autograd's input buffer and releases the sum only after
the first step's backward: from K = 2 on, a full-size gradient of every parameter is alive at
once (under ZeRO-3 too: its reduce-scatter hooks fire once, on the sum). At PixArt-α-XL/2 size
that is 1.14 GiB per rank in bf16 (benchmarks/README.md, section 10).

:class:`StepCuts` removes it without changing the gradient. :func:`~.trajectory.run_steps` runs
every checkpoint policy as before, except that the input of each differentiated step after the
first becomes a fresh leaf (``x_i.detach().requires_grad_()``); the previous step's output, with
its graph, is kept beside it. The backward then runs as a sequence of pieces, last step first:

    piece 0:  the loss             -> the parameters' gradient through step K-1, and dL/dx_{K-1}
    piece j:  <y_i, dL/dx_{i+1}>   -> the parameters' gradient through step i, and dL/dx_i
                                      (i = K-1-j; y_i = step i's output, x_i its input)

Each piece is one backward over one step's graph, so each parameter gets exactly one gradient
contribution per piece, and a hook that consumes gradients (ZeRO's reduce-scatter, or
:func:`~.estimate.drop_full_grads`) frees it before the next piece runs. Only one step's
gradient in flight is alive at a time. The surrogate's gradient with respect to ``y_i`` is
``dL/dx_{i+1}`` bit for bit (it is computed in float32 from the leaf's gradient and cast back to
the latent's dtype), so the pieces' gradients sum to plain autograd's up to the order of the
K-term sum. Compute and activation memory are the policy's own: nothing is recomputed that the
policy would not recompute.

The caller decides how each piece is backpropagated (``torch.Tensor.backward``, or DeepSpeed's
``engine.backward`` as one micro-step each; train/step_backward.py). Scaling: only piece 0 may
be scaled (by 1 / gradient-accumulation steps, say); the later pieces already carry that scale
in the leaf gradients and must be backpropagated unscaled.

:class:`CutUnroll` is what the trainer runs: the step cuts (``trajectory.per_step_backward``)
and/or the rows in sequential passes (``trajectory.rows_per_pass``: m trajectories per prompt
without m times the activations), with every piece already scaled.

:func:`loss_in_row_passes` cuts the same way at the other end of the step: between the final
sample and a loss that is a sum over rows (the terms on decoded pixels), so that the loss's own
activations (decoder, LPIPS, discriminator, CLIP) exist for one pass of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .network import Conditioning
from .trajectory import Trajectory, TrajectoryPlan

__all__ = ["CutUnroll", "StepCuts", "loss_in_row_passes", "row_slices"]


def _surrogate(output: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The scalar whose backward sends ``grad`` into ``output``'s graph: ``<output, grad>``.
    Summed in float32; its gradient with respect to ``output`` is ``grad`` cast back to
    ``output``'s dtype, bit for bit when ``grad`` came in that dtype."""
    return (output.float() * grad.float()).sum()


def row_slices(rows: int, rows_per_pass: int, group: int = 1) -> list[slice]:
    """Sequential passes over ``rows`` rows, each at most ``rows_per_pass`` rows (0: one pass)
    rounded up to a multiple of ``group`` (rows that must share a pass: a prompt's m samples)."""
    if rows_per_pass < 0 or group < 1:
        raise ValueError(f"rows_per_pass must be >= 0 and group >= 1, got {rows_per_pass}, {group}")
    size = -(-(rows_per_pass or rows) // group) * group
    return [slice(first, min(first + size, rows)) for first in range(0, rows, size)]


def loss_in_row_passes(
    sample: torch.Tensor,
    slices: Sequence[slice],
    pass_loss: Callable[[torch.Tensor, slice], torch.Tensor],
) -> torch.Tensor:
    """A loss that is a sum over row passes, backpropagated one pass at a time to ``sample``.

    ``pass_loss(rows, where)``: the loss's share of the rows ``sample[where]`` (given cut from
    ``sample``'s graph, as a leaf), e.g. a batch-mean term times the pass's fraction of the
    rows. Each pass's loss is built and backpropagated to its leaf (``torch.autograd.grad``:
    nothing accumulates on any parameter) before the next pass starts, so only one pass's graph
    is alive at a time. Returns the surrogate ``<sample, dL/dsample>``: backpropagated (alone or
    added to other terms of ``sample``) it sends the passes' summed gradient into ``sample``'s
    graph, through :func:`_surrogate` exactly as :class:`CutUnroll` sends a pass's. The
    gradient of every row is the one a single pass would give up to the batched ops' rounding;
    ``sample`` without a graph gives a surrogate without one (the loss is still evaluated).
    """
    grad = torch.zeros_like(sample)
    for where in slices:
        rows = sample[where].detach().requires_grad_(sample.requires_grad)
        loss = pass_loss(rows, where)
        if loss.requires_grad:
            (grad[where],) = torch.autograd.grad(loss, rows)
        del loss, rows  # the pass's graph goes before the next pass is built
    return _surrogate(sample, grad)


class StepCuts:
    """Records the cuts of one unroll (pass it to :func:`~.trajectory.run_steps` as ``cuts``)
    and yields its backward pieces (:meth:`pieces`). Single use."""

    def __init__(self) -> None:
        self._outputs: list[torch.Tensor] = []  # y_i: a step's output, with the step's graph
        self._leaves: list[torch.Tensor] = []  # x_{i+1}: the same values, a leaf
        self._num_cuts = 0
        self._used = False

    def cut(self, sample: torch.Tensor) -> torch.Tensor:
        """The next step's input: ``sample`` (the previous step's output) as a new leaf."""
        if self._used:
            raise RuntimeError("StepCuts is single use: make one per unroll")
        leaf = sample.detach().requires_grad_(True)
        self._outputs.append(sample)
        self._leaves.append(leaf)
        self._num_cuts += 1
        return leaf

    @property
    def num_pieces(self) -> int:
        """Backward pieces of the recorded unroll: one per differentiated step."""
        return self._num_cuts + 1

    def pieces(self, loss: torch.Tensor) -> Iterator[torch.Tensor]:
        """The scalars to backpropagate in order, the loss first. Each piece after the first is
        built from the gradient the previous backward left on a cut's leaf, so backpropagate
        each piece before asking for the next."""
        if self._used:
            raise RuntimeError("StepCuts.pieces was already run for this unroll")
        self._used = True
        yield loss
        while self._outputs:
            output, leaf = self._outputs.pop(), self._leaves.pop()
            if leaf.grad is None:
                raise RuntimeError(
                    "the previous backward piece did not reach the cut at a sampler step's input "
                    "(was the loss computed from the unroll's final sample?)"
                )
            grad = leaf.grad
            del leaf  # the step input's gradient is folded into the surrogate below
            yield _surrogate(output, grad)


class CutUnroll:
    """One micro-batch's unroll, cut for a backward in pieces: at every differentiated sampler
    step (``per_step``: no gradient sum across the steps) and/or into sequential passes of at
    most ``rows_per_pass`` rows (0: all rows in one pass).

    Passes bound the activation memory of the checkpointed policies by ``rows_per_pass`` rows
    instead of the whole batch (B x m rows with m trajectories per prompt): each pass's unroll
    runs on its own, keeping only what its policy keeps, and is backpropagated on its own. The
    loss still sees every row at once (the energy score compares a prompt's m samples, wherever
    the passes split them): it is computed on the passes' final samples cut from their graphs,
    backpropagated to them first (``torch.autograd.grad``, a cheap backward through the loss
    alone), and each pass's backward starts from the surrogate ``<final_p, dL/dfinal_p>``.

    :meth:`pieces` yields every piece already divided by ``loss_divisor`` (DeepSpeed's gradient
    accumulation steps): backpropagate each one unscaled, in order.
    """

    def __init__(self, *, per_step: bool, rows_per_pass: int = 0) -> None:
        if rows_per_pass < 0:
            raise ValueError(f"rows_per_pass must be >= 0, got {rows_per_pass}")
        self.per_step = per_step
        self.rows_per_pass = rows_per_pass
        self._finals: list[torch.Tensor] = []  # each pass's final sample, with its graph
        self._leaves: list[torch.Tensor] = []  # the same values cut from it (several passes)
        self._cuts: list[StepCuts | None] = []

    def row_slices(self, rows: int) -> list[slice]:
        """The passes over ``rows`` rows, in order."""
        return row_slices(rows, self.rows_per_pass)

    def run(
        self,
        trajectory: Trajectory,
        networks: nn.Module | Sequence[nn.Module],
        cond: Conditioning,
        start: torch.Tensor,
        noises: Sequence[torch.Tensor | None],
        plan: TrajectoryPlan,
    ) -> torch.Tensor:
        """The final sample of every row (the loss's input): :meth:`Trajectory.run` per pass."""
        if self._finals:
            raise RuntimeError("CutUnroll is single use: make one per micro-batch")
        slices = self.row_slices(start.shape[0])
        for rows in slices:
            cuts = StepCuts() if self.per_step else None
            final = trajectory.run(
                networks,
                cond if len(slices) == 1 else cond.select(rows),
                start[rows],
                [None if noise is None else noise[rows] for noise in noises],
                plan,
                cuts=cuts,
            )
            self._finals.append(final)
            self._cuts.append(cuts)
        if len(slices) == 1:
            return self._finals[0]
        self._leaves = [final.detach().requires_grad_(True) for final in self._finals]
        return torch.cat(self._leaves)

    @property
    def num_pieces(self) -> int:
        """Backward pieces: per pass, one per differentiated step (per_step) or one."""
        return sum(1 if cuts is None else cuts.num_pieces for cuts in self._cuts)

    def pieces(self, loss: torch.Tensor, loss_divisor: int = 1) -> Iterator[torch.Tensor]:
        """The scalars to backpropagate in order (each one before asking for the next)."""
        if not self._finals:
            raise RuntimeError("CutUnroll.pieces before run")
        loss = loss / loss_divisor
        if not self._leaves:  # one pass: the loss is the first piece
            cuts = self._cuts[0]
            yield from [loss] if cuts is None else cuts.pieces(loss)
            return
        grads = torch.autograd.grad(loss, self._leaves)
        self._leaves = []
        for final, grad, cuts in zip(self._finals, grads, self._cuts, strict=True):
            surrogate = _surrogate(final, grad)
            yield from [surrogate] if cuts is None else cuts.pieces(surrogate)
        self._finals = []
