"""Small-scale test of the paper's claims on the embedded digits (issue 7), from one command.

    python experiments/reproduce_small.py            # default budget: about an hour on 2 cores
    python experiments/reproduce_small.py --smoke    # a few minutes, plumbing check only

What it does, all through the engine's ``e2ed2 train`` (one subprocess per run):

1. Pretrain a 4-block PixArt denoiser with the standard diffusion loss (v-prediction).
2. Fine-tune copies of it for the same number of steps each (per fine-tune seed):
   - ``control``: more diffusion-loss training (is any gain just more training?);
   - E2ED2 through K = 1, 2, 4 LCM steps with L2;
   - the loss ablation at K = 4: L1, L2, LPIPS, L2+LPIPS, L2+LPIPS+GAN;
   - per-step networks at K = 4 with L2+LPIPS (the paper's App. D.1 setting), against the
     shared network of the same loss.
3. Score every model (and the pretrained baseline) at K = 1, 2, 4 sampling steps on the same
   sampling seeds with :mod:`e2ed2.engine.eval.digits` (digit-classifier Fréchet distance to the
   held-out split, prompted-digit accuracy) and the real-vs-real noise floor.
4. Write ``results.md`` (tables), ``results.json``, plots and sample grids into ``--results``.

Finished runs are skipped when the command is repeated (their exports are reused); an
interrupted run is restarted from scratch. Settings are fixed up front (see ``FINETUNE`` and
``PRETRAIN``); nothing here was tuned towards the paper's conclusions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

# Pretraining: the standard diffusion loss (v-prediction). Probes with 2000-3000 steps at
# LR 2e-4..2e-3 gave a model whose samples were not yet digits (still learning), hence the large
# batch, LR 1e-3 with a short warmup, and an EMA over the last ~200 steps.
PRETRAIN = {
    "objective.kind": "diffusion",
    "run.batch_per_rank": 32,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 100,
    "ema.decay": 0.995,
}
# Every fine-tune (E2ED2 and the control): the paper's batch 8 and EMA 0.95, a fixed LR a tenth
# of the pretraining one. Chosen before any fine-tune was run and not changed afterwards.
FINETUNE = {
    "run.batch_per_rank": 8,
    "ema.decay": 0.95,
    "optim.lr": 1e-4,
}
# LPIPS: the lpips package's linear heads on a *randomly initialised* VGG16 backbone (no
# ImageNet weights exist offline here), so "LPIPS" is a random-feature distance, not a
# perceptual one. GAN: the paper's App. C.2 values (weight 0.01, 5 discriminator steps).
LPIPS = {"objective.lpips_weight": 1.0, "objective.lpips_random_backbone": True}


@dataclass(frozen=True)
class Spec:
    """One fine-tune: a name, the engine overrides, and the table groups it belongs to."""

    name: str
    label: str
    overrides: dict[str, object]
    groups: tuple[str, ...] = field(default=())


SPECS: tuple[Spec, ...] = (
    Spec("control", "diffusion loss (control)", {"objective.kind": "diffusion"}, ("main",)),
    Spec("e2ed2_k1_l2", "E2ED2 K=1, L2", {"trajectory.num_steps": 1}, ("main",)),
    Spec("e2ed2_k2_l2", "E2ED2 K=2, L2", {"trajectory.num_steps": 2}, ("main",)),
    Spec("e2ed2_k4_l2", "E2ED2 K=4, L2", {"trajectory.num_steps": 4}, ("main", "loss")),
    # Paper Sec. 3.2: "samples a random timestep per iteration to construct noisy samples". With
    # a pure-noise start the loss pairs each target with noise that carries no information about
    # it, so its minimiser is the conditional mean; the noised-latent start does not have that
    # property. Added after the first full run showed the pure-noise runs losing diversity.
    Spec(
        "e2ed2_k4_l2_noised",
        "E2ED2 K=4, L2, noised-latent start",
        {"trajectory.num_steps": 4, "trajectory.start": "noised_latent"},
        ("main",),
    ),
    Spec(
        "e2ed2_k4_l1",
        "E2ED2 K=4, L1",
        {"trajectory.num_steps": 4, "objective.l1_weight": 1.0, "objective.l2_weight": 0.0},
        ("loss",),
    ),
    Spec(
        "e2ed2_k4_lpips",
        "E2ED2 K=4, LPIPS",
        {"trajectory.num_steps": 4, "objective.l2_weight": 0.0, **LPIPS},
        ("loss",),
    ),
    Spec(
        "e2ed2_k4_l2_lpips",
        "E2ED2 K=4, L2+LPIPS",
        {"trajectory.num_steps": 4, **LPIPS},
        ("main", "loss", "sharing"),
    ),
    Spec(
        "e2ed2_k4_l2_lpips_gan",
        "E2ED2 K=4, L2+LPIPS+GAN",
        {"trajectory.num_steps": 4, **LPIPS, "gan.enabled": True},
        ("loss",),
    ),
    Spec(
        "e2ed2_k4_l2_lpips_per_step",
        "E2ED2 K=4, L2+LPIPS, per-step networks",
        {"trajectory.num_steps": 4, **LPIPS, "model.share_across_steps": False},
        ("sharing",),
    ),
)
BASELINE = "pretrained"


def _override_args(overrides: dict[str, object]) -> list[str]:
    def text(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value)
        return repr(value)

    return [f"{key}={text(value)}" for key, value in overrides.items()]


def _finished(run_dir: Path) -> bool:
    return (run_dir / "export" / "e2ed2_config.toml").is_file() and (run_dir / "DONE").is_file()


def train(run_dir: Path, overrides: dict[str, object], max_steps: int) -> float:
    """Runs ``e2ed2 train`` into ``run_dir`` (one CPU thread, niced); returns its wall seconds."""
    if _finished(run_dir):
        return json.loads((run_dir / "DONE").read_text())["wall_s"]
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run restarts from scratch
    run_dir.mkdir(parents=True)
    settings = {
        **overrides,
        "run.max_steps": max_steps,
        "run.output_dir": str(run_dir),
        "run.log_every_steps": 25,
        "run.checkpoint_every_steps": max_steps,
        "run.sample_every_steps": max_steps,
        "run.keep_checkpoints": 1,
    }
    command = [sys.executable, "-m", "e2ed2.engine.cli.main", "train", *_override_args(settings)]
    # One thread per run: on 2 shared cores, oversubscribed BLAS threads cost far more than they
    # bring (measured: a diffusion step ran ~5x slower with 2 threads per process under load).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        done = subprocess.run(
            ["nice", "-n", "10", *command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {run_dir} failed (exit {done.returncode}):\n{tail}")
    (run_dir / "DONE").write_text(json.dumps({"wall_s": wall_s}))
    return wall_s


# --- statistics ---------------------------------------------------------------------------------


def _fd_values(evals: list[dict], k: int, key: str = "fd") -> list[float]:
    """Every (fine-tune seed, sampling seed) value of ``key`` at K = ``k``."""
    values = []
    for result in evals:
        entry = result["num_steps"].get(str(k), {})
        values.extend(s[key] for s in entry.get("per_seed", []))
    return values


def _cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "—"
    v = np.array(values) * scale
    spread = f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""
    return f"{v.mean():.{digits}f}{spread}"


def _paired_delta(model: list[dict], baseline: dict, k: int) -> list[float]:
    """FD(model) - FD(baseline) on the same sampling seeds, for every fine-tune seed."""
    base = baseline["num_steps"].get(str(k), {}).get("per_seed", [])
    deltas = []
    for result in model:
        mine = result["num_steps"].get(str(k), {}).get("per_seed", [])
        deltas.extend(m["fd"] - b["fd"] for m, b in zip(mine, base, strict=False))
    return deltas


# --- outputs ------------------------------------------------------------------------------------


def write_tables(
    results_dir: Path,
    evals: dict[str, list[dict]],
    floor: dict,
    args: argparse.Namespace,
    timings: dict[str, float],
) -> str:
    ks = (1, 2, 4)
    n_train = len(args.seeds)
    n_sample = len(args.eval_seeds)
    lines = [
        "# Small-scale reproduction on the embedded digits",
        "",
        f"Generated by `python experiments/reproduce_small.py{' --smoke' if args.smoke else ''}`"
        f" ({args.pretrain_steps} pretraining steps, {args.finetune_steps} fine-tuning steps, "
        f"fine-tune seeds {list(args.seeds)}, sampling seeds {list(args.eval_seeds)}, "
        f"{floor['per_class']} images per digit per sampling seed).",
        "",
        "FD: Fréchet distance in the digit classifier's 64-d feature space to the held-out "
        "digits (lower is better). Acc: share of samples the classifier reads as the prompted "
        "digit. Cells: mean ± std over every (fine-tune seed, sampling seed) pair "
        f"(n = {n_train * n_sample}; the pretrained baseline: over sampling seeds, "
        f"n = {n_sample}). ΔFD: paired difference to the baseline on the same sampling seeds.",
        "",
        "## Noise floor (real images, same sample size)",
        "",
        "| reference | FD | Acc |",
        "|---|---|---|",
        f"| real train-split digits ({floor['train_real']['num_seeds']} draws) | "
        f"{floor['train_real']['fd_mean']:.1f} ± {floor['train_real']['fd_std']:.1f} | "
        f"{100 * floor['train_real']['accuracy_mean']:.1f}% |",
        f"| real held-out digits (classifier accuracy) | — | "
        f"{100 * floor['holdout_self_accuracy']:.1f}% |",
        f"| per-class mean image (no diversity) | {floor['class_means']['fd']:.1f} | "
        f"{100 * floor['class_means']['accuracy']:.1f}% |",
        f"| Gaussian noise | {floor['gaussian_noise']['fd']:.1f} | "
        f"{100 * floor['gaussian_noise']['accuracy']:.1f}% |",
        "",
    ]

    def section(title: str, names: list[str]) -> None:
        header = "| model | " + " | ".join(f"FD K={k} | ΔFD K={k} | Acc K={k}" for k in ks)
        lines.extend([f"## {title}", "", header + " |", "|---" * (1 + 3 * len(ks)) + "|"])
        for name in names:
            row = [LABELS[name]]
            for k in ks:
                fd = _fd_values(evals[name], k)
                acc = _fd_values(evals[name], k, "accuracy")
                delta = (
                    _paired_delta(evals[name], evals[BASELINE][0], k) if name != BASELINE else []
                )
                row += [_cell(fd), _cell(delta) if name != BASELINE else "0", _cell(acc, 100)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    section(
        "Claim 1: E2ED2 fine-tuning vs the pretrained model and a diffusion-loss control",
        [BASELINE] + [s.name for s in SPECS if "main" in s.groups],
    )
    section("Claim 2: loss ablation (K = 4)", [s.name for s in SPECS if "loss" in s.groups])
    section(
        "Claim 3: one network shared across steps vs per-step networks (K = 4, L2+LPIPS)",
        [s.name for s in SPECS if "sharing" in s.groups],
    )
    lines += ["## Timings (wall seconds per training run, this machine)", ""]
    lines += ["| run | wall s |", "|---|---|"]
    lines += [f"| {name} | {wall:.0f} |" for name, wall in sorted(timings.items())]
    lines.append("")
    text = "\n".join(lines)
    (results_dir / "results.md").write_text(text)
    return text


LABELS = {BASELINE: "pretrained (diffusion loss), no fine-tune"} | {s.name: s.label for s in SPECS}


def write_plots(results_dir: Path, evals: dict[str, list[dict]], floor: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = (1, 2, 4)
    floor_fd = floor["train_real"]["fd_mean"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in [BASELINE] + [s.name for s in SPECS if "main" in s.groups]:
        for ax, key, scale in ((axes[0], "fd", 1.0), (axes[1], "accuracy", 100.0)):
            means, stds, xs = [], [], []
            for k in ks:
                v = np.array(_fd_values(evals[name], k, key)) * scale
                if len(v):
                    xs.append(k)
                    means.append(v.mean())
                    stds.append(v.std(ddof=1) if len(v) > 1 else 0.0)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=LABELS[name])
    axes[0].axhline(floor_fd, color="gray", ls="--", label="real-vs-real floor")
    axes[0].set(xlabel="sampling steps K", ylabel="FD to held-out digits (lower is better)")
    axes[0].set_yscale("log")
    axes[1].set(xlabel="sampling steps K", ylabel="prompted-digit accuracy %")
    for ax in axes:
        ax.set_xticks(ks)
    axes[0].legend(fontsize=7)
    fig.suptitle("E2ED2 fine-tuning vs baseline and diffusion-loss control")
    fig.tight_layout()
    fig.savefig(results_dir / "fd_vs_steps.png", dpi=120)
    plt.close(fig)

    for group, filename, title in (
        ("loss", "loss_ablation.png", "Loss ablation at K = 4"),
        ("sharing", "shared_vs_per_step.png", "Shared vs per-step networks at K = 4"),
    ):
        names = [BASELINE] + [s.name for s in SPECS if group in s.groups]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        for i, name in enumerate(names):
            v = np.array(_fd_values(evals[name], 4))
            ax.bar(i, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, capsize=3)
            ax.scatter(np.full(len(v), i), v, color="k", s=8, zorder=3)
        ax.axhline(floor_fd, color="gray", ls="--", label="real-vs-real floor")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([LABELS[n].replace(", ", "\n") for n in names], fontsize=7)
        ax.set_ylabel("FD at K = 4 (lower is better)")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results_dir / filename, dpi=120)
        plt.close(fig)


@torch.no_grad()
def write_sample_figure(results_dir: Path, exports: dict[str, Path], evaluator) -> None:
    """One row per model (first fine-tune seed), one column per digit, at each K; seed 0."""
    from e2ed2.engine.config.loader import load_config
    from e2ed2.engine.core.sampler import build_schedule
    from e2ed2.engine.core.sampling import generate_pixels, save_grid
    from e2ed2.engine.train.export import load_exported_networks

    cond, _ = evaluator_prompts(evaluator)
    real = torch.stack(
        [evaluator.holdout.images[evaluator.holdout.labels == c][0] for c in range(10)]
    )
    for k in (1, 2, 4):
        rows, names = [real], ["real (held-out)"]
        for name, export in exports.items():
            config = load_config(str(export / "e2ed2_config.toml"))
            if not config.model.share_across_steps and k != config.trajectory.num_steps:
                continue
            networks = load_exported_networks(export, config.trajectory.num_steps).eval()
            rows.append(
                generate_pixels(
                    networks,
                    build_schedule(config.sampler, k),
                    lambda x: x,
                    cond,
                    evaluator.train_set.latent_shape,
                    seed=0,
                    device=torch.device("cpu"),
                )
            )
            names.append(LABELS[name])
        save_grid(torch.cat(rows), results_dir / "samples" / f"samples_K{k}.png", nrow=10)
        (results_dir / "samples" / f"samples_K{k}.txt").write_text(
            "rows, top to bottom:\n" + "\n".join(names) + "\n"
        )


def evaluator_prompts(evaluator):
    from e2ed2.engine.core.network import Conditioning
    from e2ed2.engine.data.digits import DIGIT_WORDS

    states, mask = evaluator.train_set.encode([f"a handwritten digit {w}" for w in DIGIT_WORDS])
    return Conditioning(states, mask), torch.arange(10)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(REPO / "experiments" / "runs" / "small"))
    parser.add_argument("--results", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--pretrain-steps", type=int, default=6000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tune seeds")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    parser.add_argument("--smoke", action="store_true", help="tiny budget: plumbing only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pretrain_steps, args.finetune_steps = 40, 6
        args.seeds, args.eval_seeds = [0], [0]
        args.work = str(Path(args.work).with_name("smoke"))
        args.results = str(Path(args.results).with_name("results_smoke"))

    from e2ed2.engine.config.loader import load_config
    from e2ed2.engine.eval.digits import DigitEvaluator, evaluate_export

    torch.set_num_threads(1)
    work, results_dir = Path(args.work), Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "evals").mkdir(exist_ok=True)
    started = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)  # noqa: E731

    evaluator = DigitEvaluator(load_config().data, cache_dir=work / "classifier")
    floor = evaluator.noise_floor()
    (results_dir / "noise_floor.json").write_text(json.dumps(floor, indent=2) + "\n")
    log(f"noise floor: train-real FD {floor['train_real']['fd_mean']:.1f}")

    evals: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    exports: dict[str, Path] = {}
    eval_lock = threading.Lock()

    def evaluate(name: str, seed: int, run_dir: Path) -> None:
        grid_dir = results_dir / "samples" / f"{name}_seed{seed}" if seed == args.seeds[0] else None
        out = results_dir / "evals" / f"{name}_seed{seed}.json"
        cached = json.loads(out.read_text()) if out.is_file() else None
        # A repeated command reuses an evaluation made of this very run with these seeds.
        fresh = (
            cached is not None
            and cached.get("sampling_seeds") == list(args.eval_seeds)
            and out.stat().st_mtime > (run_dir / "DONE").stat().st_mtime
        )
        with eval_lock:  # one in-process evaluation at a time (next to the training subprocesses)
            if fresh:
                result = cached
            else:
                result = evaluate_export(
                    run_dir / "export",
                    seeds=args.eval_seeds,
                    evaluator=evaluator,
                    grid_dir=grid_dir,
                )
                result.update(name=name, finetune_seed=seed, sampling_seeds=list(args.eval_seeds))
                out.write_text(json.dumps(result, indent=2) + "\n")
            evals.setdefault(name, []).append(result)
        log(
            f"evaluated {name} seed {seed}: FD K=4 {np.mean(_fd_values([result], 4) or [np.nan]):.1f}"
        )

    pretrain_dir = work / BASELINE
    timings[BASELINE] = train(pretrain_dir, PRETRAIN, args.pretrain_steps)
    log(f"pretrained in {timings[BASELINE]:.0f} s")
    evaluate(BASELINE, 0, pretrain_dir)
    exports[BASELINE] = pretrain_dir / "export"

    def finetune(spec: Spec, seed: int) -> None:
        run_dir = work / f"{spec.name}_seed{seed}"
        overrides = {
            **FINETUNE,
            "model.pretrained_path": str(pretrain_dir / "export"),
            "run.seed": seed,
            **spec.overrides,
        }
        wall_s = train(run_dir, overrides, args.finetune_steps)
        timings[f"{spec.name}_seed{seed}"] = wall_s
        log(f"trained {spec.name} seed {seed} in {wall_s:.0f} s")
        evaluate(spec.name, seed, run_dir)
        if seed == args.seeds[0]:
            exports[spec.name] = run_dir / "export"

    # The most expensive runs first, so the pool does not end on one long run.
    order = sorted(SPECS, key=lambda s: -len(s.overrides))
    jobs = [(spec, seed) for seed in args.seeds for spec in order]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(finetune, spec, seed) for spec, seed in jobs]:
            future.result()

    for name in evals:
        evals[name].sort(key=lambda r: r["finetune_seed"])
    ordered_exports = {n: exports[n] for n in [BASELINE] + [s.name for s in SPECS]}
    write_sample_figure(results_dir, ordered_exports, evaluator)
    write_plots(results_dir, evals, floor)
    total_s = time.perf_counter() - started
    summary = {
        "command": " ".join(["python", "experiments/reproduce_small.py", *(argv or sys.argv[1:])]),
        "pretrain": PRETRAIN,
        "finetune": FINETUNE,
        "specs": {s.name: s.overrides for s in SPECS},
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
        "finetune_seeds": args.seeds,
        "sampling_seeds": args.eval_seeds,
        "noise_floor": floor,
        "timings_s": timings,
        "total_wall_s": total_s,
        "evals": evals,
    }
    (results_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(write_tables(results_dir, evals, floor, args, timings))
    log(f"done in {total_s / 60:.1f} min; results in {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
