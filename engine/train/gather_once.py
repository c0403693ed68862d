"""Gather ZeRO-3 parameters once per iteration and keep them across the K sampler steps.

ZeRO-3 all-gathers a module's parameters before each use and frees them after it. E2ED2 uses the
shared denoiser 3K times per iteration (K forwards, K recomputes, K backwards), so by default it
gathers the whole model up to 3K times. :func:`gathered_once` marks every partitioned parameter
persistent and external (``ds_persist``, ``is_external_param``: the two flags ZeRO-3's
per-module release honours, with or without a complete module trace) for one forward+backward:
the first use gathers it, ZeRO-3's release after each module skips it, and on exit every parameter is partitioned again, before the
optimizer step (which updates the partitions). Gradients are untouched: ZeRO-3's gradient hooks
reduce-scatter exactly as before. Cost: the full low-precision model stays gathered during the
iteration (what ``stage3_max_live_parameters`` >= model size already allows). The flags are
DeepSpeed internals: train/deepspeed_compat.py's ``keep_zero3_params_gathered`` sets them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .deepspeed_compat import keep_zero3_params_gathered

__all__ = ["gathered_once"]


@contextlib.contextmanager
def gathered_once(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, each ZeRO-3 parameter of ``module`` is gathered at most once
    (``enabled=False``, or no ZeRO-3 parameter: the block runs as it is)."""
    if not enabled:
        yield
        return
    with keep_zero3_params_gathered(module):
        yield
