"""Cost of the well-posed objectives: memory and time per step vs m, and the teacher (issue 14).

Question: what do m trajectories per prompt (the energy score needs m >= 2) and the noise-paired
teacher cost per training step? For m = 1, 2, 4 samples per prompt: peak live bytes
(LiveTensorTracker; activations + gradients, parameters excluded) and wall time of one
forward + backward through the K-step unroll under checkpoint policy ``step``, with the loss on
the final sample (m = 1: L2, the energy score is undefined for one sample; m >= 2: energy score,
beta = 1, lambda = 1). Then the teacher's cost per batch (its B·m rows, no graph, DDIM) at
teacher_steps = 8 and 32: seconds and peak live bytes, and its time relative to the student's
step at the same m.

Timing is interleaved: each repeat runs every m (and every teacher setting) once, in turn, so
that load from other jobs on the shared CPU falls on all of them alike; the reported time is the
fastest repeat, and the ratios to m = 1 are what to read. Times are CPU times, not GPU ones.

    python benchmarks/bench_objective_cost.py            # writes results/objective_cost.*
    python benchmarks/bench_objective_cost.py --smoke    # toy model, seconds
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from e2ed2.engine import LiveTensorTracker  # noqa: E402
from e2ed2.engine.config.objective import ObjectiveConfig  # noqa: E402
from e2ed2.engine.core.estimate import DenoiserShape, build_pixart, make_inputs  # noqa: E402
from e2ed2.engine.core.network import repeat_conditioning  # noqa: E402
from e2ed2.engine.objectives.losses import E2ED2Loss  # noqa: E402
from e2ed2.engine.objectives.teacher import NoisePairedTeacher  # noqa: E402

SAMPLES_PER_PROMPT = (1, 2, 4)
TEACHER_STEPS = (8, 32)
# A tiny PixArt: 4 blocks, hidden 128 (4 heads x 32), 64 image tokens (16x16 latent, patch 2),
# 16 text tokens. Small enough that m = 4 with 32 teacher steps fits a shared 2-core CPU in
# minutes; the unroll still dominates the step, as at full size.
TINY_MODEL = DenoiserShape(
    num_layers=4, num_attention_heads=4, attention_head_dim=32, caption_channels=128, text_tokens=16
)
TINY_LATENT = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, results/smoke/")
    parser.add_argument("--m", nargs="+", type=int, default=list(SAMPLES_PER_PROMPT))
    parser.add_argument("--teacher-steps", nargs="+", type=int, default=list(TEACHER_STEPS))
    parser.add_argument("--num-steps", type=int, default=4, help="K, the differentiated steps")
    parser.add_argument("--batch", type=int, default=2, help="prompts per step (B)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


class _Setup:
    """One model, one batch of B prompts, the K-step trajectory under ``step``."""

    def __init__(self, shape: DenoiserShape, latent: int, batch: int, num_steps: int) -> None:
        self.model = build_pixart(shape, latent)
        self.clean, self.cond = make_inputs(shape, latent, batch, torch.float32)
        self.trajectory = _common.make_trajectory("step", num_steps)
        self.losses = {
            1: E2ED2Loss(ObjectiveConfig()),
            0: E2ED2Loss(ObjectiveConfig(l2_weight=0, energy_weight=1.0)),  # any m >= 2
        }

    def rows(self, m: int) -> tuple[torch.Tensor, object]:
        return self.clean.repeat_interleave(m, dim=0), repeat_conditioning(self.cond, m)

    def train_step(self, m: int) -> None:
        """Forward through K steps for B·m rows, the loss on the final samples, backward."""
        self.model.zero_grad(set_to_none=True)
        clean, cond = self.rows(m)
        g = torch.Generator().manual_seed(m)
        sample, _ = self.trajectory(self.model, cond, clean=clean, generator=g)
        loss_fn = self.losses[1 if m == 1 else 0]
        loss_fn(sample, clean, samples_per_prompt=m)["total"].backward()

    def teacher_sample(self, teacher: NoisePairedTeacher, m: int) -> None:
        clean, cond = self.rows(m)
        plan = self.trajectory.plan(torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(m)
        start, noises = self.trajectory.draw_noise(plan, clean.shape, clean=clean, generator=g)
        generators = [torch.Generator().manual_seed(j) for j in range(clean.shape[0])]
        teacher.sample(
            cond=cond,
            start=start,
            student_schedule=self.trajectory.schedule,
            student_noises=noises,
            generators=generators,
        )


def _peak_bytes(fn) -> int:
    fn()  # warm-up (allocator, lazy init)
    with LiveTensorTracker(track_cuda=False) as tracker:
        fn()
    return tracker.report().peak_bytes


def run(args: argparse.Namespace, name: str = "objective_cost") -> dict:
    torch.set_num_threads(args.threads)
    if args.smoke:
        shape, latent, repeats = _common.SMOKE_MODEL, _common.SMOKE_LATENT, 1
        args.teacher_steps = [2, 4]  # the same code path, fewer network calls
    else:
        shape, latent, repeats = TINY_MODEL, TINY_LATENT, args.repeats
    setup = _Setup(shape, latent, args.batch, args.num_steps)
    teachers = {
        s: NoisePairedTeacher(
            setup.model,
            ObjectiveConfig(l2_weight=0, teacher_weight=1.0, teacher_steps=s),
            setup.trajectory.schedule.config,
        )
        for s in args.teacher_steps
    }
    jobs = {("train", m, 0): (lambda m=m: setup.train_step(m)) for m in args.m}
    for s, teacher in teachers.items():
        for m in args.m:
            jobs["teacher", m, s] = lambda t=teacher, m=m: setup.teacher_sample(t, m)
    peaks = {key: _peak_bytes(fn) for key, fn in jobs.items()}
    seconds: dict[tuple, list[float]] = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            start = time.perf_counter()
            fn()
            seconds[key].append(time.perf_counter() - start)
    best = {key: min(values) for key, values in seconds.items()}

    base_m = min(args.m)
    rows = []
    for m in args.m:
        key = ("train", m, 0)
        row = {
            "m": m,
            "rows_per_step": args.batch * m,
            "objective": "l2" if m == 1 else "energy",
            "peak_bytes": peaks[key],
            "step_seconds": best[key],
            "peak_over_m1": peaks[key] / peaks["train", base_m, 0],
            "time_over_m1": best[key] / best["train", base_m, 0],
        }
        for s in args.teacher_steps:
            teacher = ("teacher", m, s)
            row[f"teacher{s}_peak_bytes"] = peaks[teacher]
            row[f"teacher{s}_seconds"] = best[teacher]
            row[f"teacher{s}_over_step"] = best[teacher] / best[key]
        rows.append(row)
        teacher_text = ", ".join(
            f"teacher {s}: {row[f'teacher{s}_seconds']:.3f} s "
            f"({row[f'teacher{s}_over_step']:.2f}x the step)"
            for s in args.teacher_steps
        )
        print(
            f"m={m} ({row['objective']}): peak {_common.mib(row['peak_bytes']):8.2f} MiB "
            f"({row['peak_over_m1']:.2f}x m={base_m}), {row['step_seconds']:.3f} s "
            f"({row['time_over_m1']:.2f}x); {teacher_text}",
            flush=True,
        )
    payload = {
        "model": {**shape.__dict__, "latent_size": latent, "batch": args.batch, "dtype": "float32"},
        "num_steps": args.num_steps,
        "checkpoint_policy": "step",
        "teacher_sampler": "ddim",
        "repeats": repeats,
        "rows": rows,
        "all_seconds": {"/".join(map(str, key)): values for key, values in seconds.items()},
    }

    ms = list(args.m)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / (1 + len(args.teacher_steps))
    for i, (label, peak_key, time_key) in enumerate(
        [(f"train step (K={args.num_steps}, step)", "peak_bytes", "step_seconds")]
        + [
            (f"teacher, {s} steps", f"teacher{s}_peak_bytes", f"teacher{s}_seconds")
            for s in args.teacher_steps
        ]
    ):
        xs = [j + (i - len(args.teacher_steps) / 2) * width for j in range(len(ms))]
        axes[0].bar(xs, [_common.mib(r[peak_key]) for r in rows], width, label=label)
        axes[1].bar(xs, [r[time_key] for r in rows], width, label=label)
    for ax, title in zip(
        axes, ("peak live MiB", f"seconds (CPU, {args.threads} thread)"), strict=True
    ):
        ax.set_xticks(range(len(ms)), [f"m={m}" for m in ms])
        ax.set_xlabel("samples per prompt m (B·m rows)")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.suptitle(
        f"objective cost vs m: {shape.num_layers} blocks, hidden {shape.hidden_size}, "
        f"{(latent // shape.patch_size) ** 2} tokens, B={args.batch}, fp32, CPU"
    )
    _common.write_result(name, payload, fig, smoke=args.smoke)
    return payload


if __name__ == "__main__":
    run(parse_args())
