"""The core wing's reliance on DeepSpeed behaviour that its public API does not promise.

The training wing's are in train/deepspeed_compat.py (its docstring says what counts as
public); this one sits in core/ because the trajectory (core, import rank 1) needs it and may not
import train/. Each function names the DeepSpeed version it was written against (0.19).
"""

from __future__ import annotations

import torch

__all__ = ["linear_mutates_its_matmul_output"]


def linear_mutates_its_matmul_output() -> bool:
    """True while DeepSpeed's ZeRO-3 ``memory_efficient_linear`` has replaced torch's linear.

    DeepSpeed 0.19's ZeRO-3 (``memory_efficient_linear``, on by default) replaces
    ``torch.nn.functional.linear`` process-wide with an autograd function (from its module
    ``deepspeed.runtime.zero.linear``) that adds the bias *in place* to its matmul output. A
    selective checkpoint keeps that matmul output by reference, so the in-place add corrupts what
    the recompute replays (wrong gradients, no error). Detected by the replacement's module name;
    no import of DeepSpeed, which the core wing does not need.
    """
    return getattr(torch.nn.functional.linear, "__module__", "").startswith("deepspeed")
