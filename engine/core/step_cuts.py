"""Backward one sampler step at a time: the unroll's graph cut at every step boundary.

With one network shared by the K steps, a single backward through the unroll sums each
parameter's K gradient contributions in autograd's input buffer and releases the sum only after
the first step's backward: from K = 2 on, a full-size gradient of every parameter is alive at
once (under ZeRO-3 too: its reduce-scatter hooks fire once, on the sum). At PixArt-α-XL/2 size
that is 1.14 GiB per rank in bf16 (benchmarks/README.md, section 10).

:class:`StepCuts` removes it without changing the gradient. :func:`~.trajectory.run_steps` runs
every checkpoint policy as before, except that the input of each differentiated step after the
first becomes a fresh leaf (``x_i.detach().requires_grad_()``); the previous step's output, with
its graph, is kept beside it. The backward then runs as a sequence of pieces, last step first:

    piece 0:  the loss                 -> gradients of step K-1's parameters use, and dL/dx_{K-1}
    piece j:  <y_i, dL/dx_{i+1}>       -> gradients of step i's use, and dL/dx_i      (i = K-1-j)

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
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["StepCuts"]


class StepCuts:
    """Records the cuts of one unroll (pass it to :func:`~.trajectory.run_steps` as ``cuts``)
    and yields its backward pieces (:meth:`pieces`). Single use."""

    def __init__(self) -> None:
        self._outputs: list[torch.Tensor] = []  # y_i: a step's output, with the step's graph
        self._leaves: list[torch.Tensor] = []  # x_{i+1}: the same values, a leaf
        self._used = False

    def cut(self, sample: torch.Tensor) -> torch.Tensor:
        """The next step's input: ``sample`` (the previous step's output) as a new leaf."""
        if self._used:
            raise RuntimeError("StepCuts is single use: make one per unroll")
        leaf = sample.detach().requires_grad_(True)
        self._outputs.append(sample)
        self._leaves.append(leaf)
        return leaf

    @property
    def num_pieces(self) -> int:
        """Backward pieces of the recorded unroll: one per differentiated step."""
        return len(self._outputs) + 1

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
            grad = leaf.grad.float()
            del leaf  # the step input's gradient is folded into the surrogate below
            yield (output.float() * grad).sum()
