"""``trajectory.per_step_backward``: each sampler step's backward as one DeepSpeed micro-step.

The unroll's graph is cut at every step (core/step_cuts.py) and its backward runs as K pieces,
last step first. Each piece goes through ``engine.backward`` as a micro-step of its own, so ZeRO
treats it as gradient accumulation: ZeRO-3 reduce-scatters each parameter's contribution into
its partition as the piece's hooks fire and frees the full-size gradient, ZeRO-2 reduces it into
its partitioned buffer. Nothing full-size outlives a piece, at the price of K reduce-scatters of
the gradient per micro-batch instead of one (ZeRO-0/1 all-reduce once, at the boundary, as
before: they keep full gradients anyway and gain nothing).

Three parts of DeepSpeed's micro-step contract are kept by hand, because the K pieces follow one
unroll's K forward calls instead of each following its own forward:

* Scaling. ``engine.backward`` divides piece 0 (the loss) by the gradient accumulation steps;
  the later pieces carry that factor in their cut gradients already and go unscaled
  (``scale_wrt_gas=False``). (fp16's loss scale would be applied twice: refused by the config.)
* The boundary. ``set_gradient_accumulation_boundary`` marks only the last piece of the last
  micro-batch, where DeepSpeed then all-reduces (ZeRO-0/1) and ``engine.step()`` updates.
* The micro-step counter. A ZeRO optimizer closes a micro-step at the start of the next
  ``engine.forward`` (``clear_backward_seen_flag``: ZeRO-3 moves from copying a micro-step's
  first gradient partitions to adding, ZeRO-1/2 clear their accumulation attributes). Before
  each piece after the first the same call is made here, as if a forward had started.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.step_cuts import StepCuts

__all__ = ["backward_per_step"]


def _close_micro_step(engine: Any) -> None:
    """What ``engine.forward`` does first: a ZeRO optimizer closes the previous micro-step."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()


def backward_per_step(
    engine: Any, loss: torch.Tensor, cuts: StepCuts, *, last_micro_batch: bool
) -> None:
    """Backpropagates ``loss`` through the cut unroll one sampler step per micro-step.

    ``last_micro_batch``: this micro-batch ends the optimizer step (its last piece is the
    gradient accumulation boundary; call ``engine.step()`` after this returns, as usual).
    """
    last = cuts.num_pieces - 1
    for index, piece in enumerate(cuts.pieces(loss)):
        if index:
            _close_micro_step(engine)
        engine.set_gradient_accumulation_boundary(last_micro_batch and index == last)
        engine.backward(piece, scale_wrt_gas=index == 0)
