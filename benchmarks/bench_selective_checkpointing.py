"""Selective checkpointing vs ``step`` (issue 5, question 3).

Question: does keeping the expensive ops' outputs (matmuls, attention, patch convolution:
``e2ed2.engine.core.trajectory.SELECTIVE_SAVE_OPS``) and recomputing only the elementwise ops buy back
``step``'s recompute time, and at what memory? Same measurements and model as
``bench_checkpoint_policies.py`` (peak live bytes, fastest-of-5 interleaved step seconds, FLOPs for K = 1, 2, 4, 8)
for ``none``, ``step`` and ``selective``. Times are CPU times on this machine, not GPU performance.

    python benchmarks/bench_selective_checkpointing.py           # results/selective_checkpointing.*
    python benchmarks/bench_selective_checkpointing.py --smoke
"""

from __future__ import annotations

import bench_checkpoint_policies

if __name__ == "__main__":
    args = bench_checkpoint_policies.parse_args()
    if args.policies == list(bench_checkpoint_policies.POLICIES):
        args.policies = ["none", "step", "selective"]
    bench_checkpoint_policies.run(args, name="selective_checkpointing")
