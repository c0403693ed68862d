"""A micro-batch's unroll backpropagated in pieces through DeepSpeed, one micro-step each.

``trajectory.per_step_backward`` cuts the unroll's graph at every sampler step and
``trajectory.rows_per_pass`` runs the rows in sequential passes (core/step_cuts.py:
:class:`~e2ed2.engine.core.step_cuts.CutUnroll`); either way the backward becomes a sequence of
pieces, and each piece goes through ``engine.backward`` as a micro-step of its own. ZeRO treats
that as gradient accumulation: ZeRO-3 reduce-scatters each parameter's contribution into its
partition as the piece's hooks fire and frees the full-size gradient, ZeRO-2 reduces it into its
partitioned buffer. With the per-step cut nothing full-size outlives a piece, at the price of
one reduce-scatter of the gradient per piece instead of one per micro-batch (ZeRO-0/1 all-reduce
once, at the boundary, as before: they keep full gradients anyway).

Three parts of DeepSpeed's micro-step contract are kept by hand, because the pieces follow one
unroll's forward calls instead of each following its own forward:

* Scaling. Every piece arrives divided by the gradient accumulation steps already (the loss
  piece by :meth:`CutUnroll.pieces`, the later ones through the cut gradients) and goes through
  ``engine.backward(piece, scale_wrt_gas=False)``. (fp16's loss scale would be applied at every
  piece: the config refuses fp16 with either option.)
* The boundary. ``set_gradient_accumulation_boundary`` marks only the last piece of the last
  micro-batch, where DeepSpeed then all-reduces (ZeRO-0/1) and ``engine.step()`` updates.
* The micro-step counter. A ZeRO optimizer closes a micro-step at the start of the next
  ``engine.forward`` (``clear_backward_seen_flag``: ZeRO-3 moves from copying a micro-step's
  first gradient partitions to adding, ZeRO-1/2 clear their accumulation attributes). Before
  each piece after the first the same call is made here, as if a forward had started
  (:func:`~e2ed2.engine.train.deepspeed_compat.close_micro_step`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..core.step_cuts import CutUnroll
from .deepspeed_compat import close_micro_step

__all__ = ["backward_each", "backward_in_pieces"]


def backward_each(
    engine: Any, pieces: Iterable[torch.Tensor], num_pieces: int, *, last_micro_batch: bool
) -> list[torch.Tensor]:
    """Backpropagates each of ``num_pieces`` already scaled ``pieces`` as one DeepSpeed
    micro-step (the contract above); returns their values (detached, not synchronised).

    ``pieces`` may be a generator that builds each piece after the previous one's backward
    (the discriminator's loss in row passes, objectives/gan.py ``discriminator_pieces``).
    ``last_micro_batch``: these pieces end the optimizer step (the last one is the gradient
    accumulation boundary; call ``engine.step()`` after this returns, as usual).
    """
    values = []
    last = num_pieces - 1
    for index, piece in enumerate(pieces):
        if index:
            close_micro_step(engine)
        engine.set_gradient_accumulation_boundary(last_micro_batch and index == last)
        engine.backward(piece, scale_wrt_gas=False)
        values.append(piece.detach())
    return values


def backward_in_pieces(
    engine: Any, unroll: CutUnroll, loss: torch.Tensor, *, last_micro_batch: bool
) -> None:
    """Backpropagates ``loss`` through the cut ``unroll``, one DeepSpeed micro-step per piece.

    ``last_micro_batch``: this micro-batch ends the optimizer step (its last piece is the
    gradient accumulation boundary; call ``engine.step()`` after this returns, as usual).
    """
    pieces = unroll.pieces(loss, loss_divisor=engine.gradient_accumulation_steps())
    backward_each(engine, pieces, unroll.num_pieces, last_micro_batch=last_micro_batch)
