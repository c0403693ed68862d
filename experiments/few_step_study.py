"""Issue 25's study: few-step objectives on the shipped digits base, against the 16-step teacher
and a consistency-distillation baseline, at equal optimizer steps and at equal compute.

One run at a time (the machine is shared): ``run NAME --seed S`` trains one model (a child
process with one CPU thread: ``e2ed2 train`` for the engine's objectives, ``consistency_distill.py``
for the baseline), records the child's CPU seconds (``resource.getrusage(RUSAGE_CHILDREN)``: user
+ system, the compute measure, since wall-clock is unreliable on a shared machine) and wall
seconds, then scores the export with ``e2ed2 evaluate`` at K = 1, 2, 4 on sampling seeds 0, 1, 2
with one cached digit classifier (the same classifier for every row). ``teacher`` scores the frozen
base as the 16-step DDIM sampler; ``table`` writes ``results/few_step/results.md``.

    python experiments/few_step_study.py run path_lcm --seed 0
    python experiments/few_step_study.py teacher
    python experiments/few_step_study.py table

Everything lands in ``experiments/results/few_step/`` (committed: ``records/*.json`` with the
per-seed scores and CPU seconds, ``results.md``); the training folders in ``experiments/runs/``
(git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results" / "few_step"
WORK = ROOT / "experiments" / "runs" / "few_step"
CLASSIFIER_CACHE = WORK / "classifier"
SAMPLING_SEEDS = (0, 1, 2)
NUM_STEPS = (1, 2, 4)

#: The engine's objectives: `e2ed2 train --config embedded` plus these overrides (the preset's
#: 300 steps, batch 8, LR 3e-4, EMA 0.99, K drawn from {1, 2, 4}, one thread). The preset's own
#: GAN settings (the main job since issue 25's study: `start_ddim_gan_warm`) are overridden
#: explicitly, so that every row keeps the settings it was measured with.
NO_GAN = ["gan.enabled=false"]
#: The 4-conv GAN at a constant weight (the [gan] defaults; the preset ramps it in).
CONSTANT_GAN = [
    "gan.enabled=true",
    "gan.weight_schedule=constant",
    "gan.weight_start_step=0",
    "gan.weight_warmup_steps=0",
]
#: The budget every engine row was measured with, put before each row's own overrides (which win):
#: 300 optimizer steps with K drawn uniformly from {1, 2, 4}, the preset's until issue 25's
#: fourth batch (the preset now runs 450 steps, K = 1 half the time: main_k1x2_450).
#: Also pinned there, for the same reason: the preset's teacher (16-step DDIM), discriminator
#: updates (5), GAN weight (0.01) and EMA decay (0.99) until the fifth batch (the preset since:
#: 12-step DPM-Solver++, 2 updates from the fourth batch on, 0.03, EMA 0.98). Rows that changed
#: them say so in their own list.
BUDGET_300 = [
    "run.max_steps=300",
    "run.checkpoint_every_steps=300",
    "run.sample_every_steps=300",
    "trajectory.num_steps_choices=[1,2,4]",
    "objective.teacher_sampler=ddim",
    "objective.teacher_steps=16",
    "gan.disc_steps_per_gen_step=5",
    "gan.weight=0.01",
    "ema.decay=0.99",
]
#: The main job's settings from the second batch to the fourth (start_ddim_gan_warm).
MAIN = [
    "objective.teacher_path=start",
    "sampler.kind=ddim",
    "gan.enabled=true",
    "gan.weight_schedule=linear_warmup",
    "gan.weight_start_step=150",
    "gan.weight_warmup_steps=50",
]
#: The main job of the fourth batch before its discriminator change: K = 1 half the time, 450
#: steps, the GAN's ramp scaled with the run (held at 0 for 225 steps, ramped over 75).
K1X2_450 = [
    *MAIN,
    "trajectory.num_steps_choices=[1,1,2,4]",
    "run.max_steps=450",
    "run.checkpoint_every_steps=450",
    "run.sample_every_steps=450",
    "gan.weight_start_step=225",
    "gan.weight_warmup_steps=75",
]
#: The main job since the fourth batch (main_k1x2_450_d2).
MAIN_D2 = [*K1X2_450, "gan.disc_steps_per_gen_step=2"]


def _steps(max_steps: int) -> list[str]:
    """The main job's run length set to ``max_steps``, its GAN ramp scaled alike (held at 0 for
    half the run, ramped over the next sixth)."""
    return [
        f"run.max_steps={max_steps}",
        f"run.checkpoint_every_steps={max_steps}",
        f"run.sample_every_steps={max_steps}",
        f"gan.weight_start_step={max_steps // 2}",
        f"gan.weight_warmup_steps={max_steps // 6}",
    ]


def _dpm(teacher_steps: int, max_steps: int) -> list[str]:
    """MAIN_D2 with the DPM-Solver++(2M) teacher (objective.teacher_sampler = "dpm_solver") of
    ``teacher_steps`` steps, run for ``max_steps`` (:func:`_steps`)."""
    return [
        *MAIN_D2,
        "objective.teacher_sampler=dpm_solver",
        f"objective.teacher_steps={teacher_steps}",
        *_steps(max_steps),
    ]


#: The fifth batch's 12-step DPM-Solver++ teacher for 600 steps.
DPM12_600 = _dpm(12, 600)
#: The fifth batch's main job before its GAN change (main_dpm12_600_ema98).
MAIN5 = [*DPM12_600, "ema.decay=0.98"]
#: The main job since the fifth batch (main5_gan03_200): MAIN5 with the GAN at 0.03 from step 200.
MAIN5_GAN = [*MAIN5, "gan.weight=0.03", "gan.weight_start_step=200"]

ENGINE_RUNS: dict[str, list[str]] = {
    # The main job before issue 25: start-noise teacher, DDIM student (sampled with DDIM).
    "start_ddim": ["objective.teacher_path=start", "sampler.kind=ddim", *NO_GAN],
    # The LCM-path teacher with the paper's LCM sampler.
    "path_lcm": ["objective.teacher_path=student", "sampler.kind=lcm", *NO_GAN],
    # + the paper's 4-conv GAN on real digits (weight 0.01, 5 discriminator steps per step).
    "path_lcm_gan": [
        "objective.teacher_path=student",
        "sampler.kind=lcm",
        *CONSTANT_GAN,
    ],
    # The main job before issue 25 + the same GAN.
    "start_ddim_gan": ["objective.teacher_path=start", "sampler.kind=ddim", *CONSTANT_GAN],
    # The main job + a discriminator of heads on the frozen base denoiser's features at blocks
    # 1 and 3 of 4, samples re-noised to t in [0, 500] (LADD-style; the same weight 0.01, 5
    # discriminator steps per step and BCE loss as the 4-conv GAN); per-token heads, the only
    # head at the time.
    "start_ddim_ladd": [
        "objective.teacher_path=start",
        "sampler.kind=ddim",
        *CONSTANT_GAN,
        "gan.discriminator=denoiser_features",
        "gan.feature_head=token",
        "gan.feature_t_max=500",
    ],
    # The same two GANs with their generator weight at 0 for the first half of the run (the
    # teacher term alone), then ramped linearly to 0.01 over 50 steps; the discriminator trains
    # from the first step.
    "start_ddim_gan_warm": MAIN,
    # Issue 25, fourth batch: the main job (start_ddim_gan_warm) with one change each.
    # K = 1 drawn half the time (choices [1, 1, 2, 4]): the weakest budget gets twice the steps,
    # and a K = 1 step is the cheapest.
    "main_k1x2": [*MAIN, "trajectory.num_steps_choices=[1,1,2,4]"],
    # K = 1 drawn three times in five (choices [1, 1, 1, 2, 4]).
    "main_k1x3": [*MAIN, "trajectory.num_steps_choices=[1,1,1,2,4]"],
    # main_k1x2 with a 32-step teacher (the base's 32-step DDIM scores 34.4 against 37.5 at 16
    # steps): a better target at twice the teacher's cost.
    "main_k1x2_t32": [
        *MAIN,
        "trajectory.num_steps_choices=[1,1,2,4]",
        "objective.teacher_steps=32",
    ],
    # main_k1x2 for 1.5x the optimizer steps (450, the ramp scaled alike).
    "main_k1x2_450": K1X2_450,
    # main_k1x2_450 with 2 discriminator updates per step instead of 5 (a cheaper step): the
    # main job since the fourth batch.
    "main_k1x2_450_d2": MAIN_D2,
    # Issue 25, fifth batch: the main job for 600 optimizer steps (the 16-step DDIM teacher): what
    # more steps alone give, against which the cheaper teachers below are read.
    "main_600": [*MAIN_D2, *_steps(600)],
    # The teacher as diffusers' DPM-Solver++(2M) for 600 steps: 8 steps score about what DDIM
    # does in 16 (36.8 against 37.5) at half the teacher's calls, spent on more optimizer steps.
    "main_dpm8_600": _dpm(8, 600),
    # main_dpm8_600 for 800 steps (about the CPU of the fourth batch's main job).
    "main_dpm8_800": _dpm(8, 800),
    # A better target: 16 DPM-Solver++ steps score 32.2 (DDIM 32: 34.3), for 600 steps.
    "main_dpm16_600": _dpm(16, 600),
    # Between the two: 12 steps (33.1 alone) for 600 steps.
    "main_dpm12_600": DPM12_600,
    # main_dpm12_600 with the EMA's decay 0.995 instead of 0.99 (a longer average).
    "main_dpm12_600_ema995": [*DPM12_600, "ema.decay=0.995"],
    # ... and 0.98 (a shorter one).
    "main_dpm12_600_ema98": MAIN5,
    # ... and 0.95 (the paper's).
    "main_dpm12_600_ema95": [*DPM12_600, "ema.decay=0.95"],
    # main_dpm12_600_ema98 (the main job since the fifth batch) with one change each:
    # the GAN's generator term from step 200 instead of 300 (ramped over 100 steps either way);
    "main5_gan200": [*MAIN5, "gan.weight_start_step=200"],
    # the GAN's generator weight ramped to 0.02 instead of 0.01.
    "main5_gan02": [*MAIN5, "gan.weight=0.02"],
    # ... ramped to 0.03;
    "main5_gan03": [*MAIN5, "gan.weight=0.03"],
    # ... 0.02 from step 200.
    "main5_gan02_200": [*MAIN5, "gan.weight=0.02", "gan.weight_start_step=200"],
    # ... 0.03 from step 200;
    "main5_gan03_200": MAIN5_GAN,
    # ... 0.05 from step 200.
    "main5_gan05_200": [*MAIN5, "gan.weight=0.05", "gan.weight_start_step=200"],
    # main5_gan03_200 (the main job now) with K = 4 drawn twice as often (choices [1, 1, 2, 4, 4]).
    "main5_gan03_200_k4x2": [*MAIN5_GAN, "trajectory.num_steps_choices=[1,1,2,4,4]"],
    # main_dpm12_600 with the generator's learning rate decayed on a half cosine to 0.1 x 3e-4 at
    # the last step (optim.lr_schedule = "cosine") instead of held.
    "main_dpm12_600_cos": [*DPM12_600, "optim.lr_schedule=cosine", "optim.min_lr_ratio=0.1"],
    # The generator's learning rate 3e-4 -> 1e-3.
    "main_lr1e3": [*MAIN, "optim.lr=1e-3"],
    # The GAN's generator weight ramped to 0.03 instead of 0.01.
    "main_gan03": [*MAIN, "gan.weight=0.03"],
    # The feature discriminator's conv heads (the token grid read jointly), t in [0, 250].
    "start_ddim_ladd_warm": [
        "objective.teacher_path=start",
        "sampler.kind=ddim",
        "gan.enabled=true",
        "gan.discriminator=denoiser_features",
        "gan.feature_head=conv",
        "gan.feature_t_max=250",
        "gan.weight_schedule=linear_warmup",
        "gan.weight_start_step=150",
        "gan.weight_warmup_steps=50",
    ],
    # The main job + the energy score against the data (objectives/energy.py compares each
    # prompt's m = 2 samples with its real digit), weight 0.1.
    "start_ddim_energy": [
        "objective.teacher_path=start",
        "sampler.kind=ddim",
        *NO_GAN,
        "objective.energy_weight=0.1",
        "trajectory.samples_per_prompt=2",
    ],
    # + the energy score against the data, m = 2 samples per prompt.
    "path_lcm_energy": [
        "objective.teacher_path=student",
        "sampler.kind=lcm",
        *NO_GAN,
        "objective.energy_weight=0.1",
        "trajectory.samples_per_prompt=2",
    ],
}
#: Consistency distillation (consistency_distill.py): optimizer steps per run. ``cd_steps`` is
#: the main job's 300; ``cd_compute`` is set from the measured CPU seconds (see the README).
CD_RUNS: dict[str, list[str]] = {
    "cd_steps": ["--steps", "300"],
    # 300 x the side-by-side CPU ratio (cost.json): path_lcm / cd = 7.04 -> 2112 steps;
    # start_ddim / cd = 5.46 -> 1638 steps, exported on the way (identical to a shorter run).
    "cd_compute": ["--steps", "2112", "--export-at", "1638"],
    # The fourth batch's main job (main_k1x2_450): 450 x 6.8 (cost_main.json and
    # cost_main_from200.json: main_k1x2 / cd = 6.81 over steps 0-11, 6.76 over steps 200-211,
    # the ramped GAN included) -> 3060 steps; its export at 2040 is main_k1x2's 300 steps.
    "cd_compute_450": ["--steps", "3060", "--export-at", "2040"],
}


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str], log: Path) -> tuple[float, float]:
    """Runs ``command`` (output to ``log``); returns its CPU and wall seconds."""
    cpu, wall = _child_cpu_seconds(), time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{command[:3]}... failed with exit {code}; see {log}")
    return _child_cpu_seconds() - cpu, time.perf_counter() - wall


def _evaluate(export: Path, out: Path, log: Path, extra: list[str] | None = None) -> dict:
    command = [
        sys.executable,
        "-P",
        "-m",
        "e2ed2.engine.cli.main",
        "evaluate",
        str(export),
        "--num-steps",
        *map(str, NUM_STEPS),
        "--seeds",
        *map(str, SAMPLING_SEEDS),
        "--classifier-cache",
        str(CLASSIFIER_CACHE),
        "--out",
        str(out),
        *(extra or []),
    ]
    _timed(command, log)
    return json.loads(out.read_text())


def run(name: str, seed: int) -> None:
    folder = WORK / f"{name}_s{seed}"
    OUT.joinpath("records").mkdir(parents=True, exist_ok=True)
    record_path = OUT / "records" / f"{name}_s{seed}.json"
    if name in ENGINE_RUNS:
        command = [
            sys.executable,
            "-P",
            "-m",
            "e2ed2.engine.cli.main",
            "train",
            "--config",
            "embedded",
            f"run.output_dir={folder}",
            f"run.seed={seed}",
            "run.compare_with_base=false",
            "run.overwrite=true",
            "run.resume=false",
            *BUDGET_300,
            *ENGINE_RUNS[name],
        ]
        settings = ENGINE_RUNS[name]
    elif name in CD_RUNS:
        command = [
            sys.executable,
            str(ROOT / "experiments" / "consistency_distill.py"),
            "--out",
            str(folder),
            "--seed",
            str(seed),
            *CD_RUNS[name],
        ]
        settings = CD_RUNS[name]
    else:
        raise SystemExit(f"unknown run {name!r}; one of {[*ENGINE_RUNS, *CD_RUNS]}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    cpu_s, wall_s = _timed(command, folder.parent / f"{name}_s{seed}.train.log")
    scores = _evaluate(
        folder / "export",
        folder.parent / f"{name}_s{seed}.eval.json",
        folder.parent / f"{name}_s{seed}.eval.log",
    )
    record = {
        "name": name,
        "seed": seed,
        "settings": settings,
        "train_cpu_s": round(cpu_s, 1),
        "train_wall_s": round(wall_s, 1),
        "fd": {k: [s["fd"] for s in v["per_seed"]] for k, v in scores["num_steps"].items()},
        "accuracy": {
            k: [s["accuracy"] for s in v["per_seed"]] for k, v in scores["num_steps"].items()
        },
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("name", "seed", "train_cpu_s", "fd")}))
    for extra in sorted(folder.glob("export_step*")):
        # An intermediate export of the same run: CPU = the run's minus the training after it.
        step = int(extra.name.removeprefix("export_step"))
        log = {e["step"]: e["cpu_s"] for e in json.loads((folder / "metrics.json").read_text())}
        scores = _evaluate(
            extra,
            folder.parent / f"{name}_s{seed}_step{step}.eval.json",
            folder.parent / f"{name}_s{seed}_step{step}.eval.log",
        )
        sub = dict(record, name=f"{name}@{step}", settings=[*settings, f"exported at {step}"])
        sub["train_cpu_s"] = round(cpu_s - (log[max(log)] - log[step]), 1)
        sub["train_wall_s"] = None
        sub["fd"] = {k: [s["fd"] for s in v["per_seed"]] for k, v in scores["num_steps"].items()}
        sub["accuracy"] = {
            k: [s["accuracy"] for s in v["per_seed"]] for k, v in scores["num_steps"].items()
        }
        (OUT / "records" / f"{name}@{step}_s{seed}.json").write_text(
            json.dumps(sub, indent=2) + "\n"
        )
        print(json.dumps({k: sub[k] for k in ("name", "seed", "train_cpu_s", "fd")}))


def teacher() -> None:
    """The frozen base as the teacher samplers alone: DDIM at 16 and 32 steps, DPM-Solver++(2M)
    at 8, 12 and 16 (the main job's teacher since the fifth batch: 12), and LCM at K = 1, 2, 4
    (the LCM-path teacher's own sampler is not an export)."""
    from e2ed2.engine.config import load_config

    config = load_config("embedded", [])
    base = Path(config.model.pretrained_path)
    record = {"name": "teacher_ddim16", "seed": None}
    scores = {}
    for kind in ("ddim", "lcm"):
        export = WORK / f"base_{kind}"
        _write_base_export(export, kind)
        # DDIM: the main job's 16-step teacher, and 32 steps (a teacher twice as long).
        steps = ["--num-steps", "16", "32"] if kind == "ddim" else []
        out = WORK / f"base_{kind}.eval.json"
        command = [
            sys.executable,
            "-P",
            "-m",
            "e2ed2.engine.cli.main",
            "evaluate",
            str(export),
            *(steps or ["--num-steps", *map(str, NUM_STEPS)]),
            "--seeds",
            *map(str, SAMPLING_SEEDS),
            "--classifier-cache",
            str(CLASSIFIER_CACHE),
            "--out",
            str(out),
        ]
        if kind == "ddim":
            command += ["--noise-floor"]
        _timed(command, WORK / f"base_{kind}.eval.log")
        scores[kind] = json.loads(out.read_text())
    record["base"] = str(base)
    record["fd"] = {
        f"{kind}:{k}": [s["fd"] for s in v["per_seed"]]
        for kind, result in scores.items()
        for k, v in result["num_steps"].items()
    }
    record["noise_floor"] = scores["ddim"].get("noise_floor")
    record["fd"].update(_dpm_solver_teacher(WORK / "base_ddim", (8, 12, 16)))
    OUT.joinpath("records").mkdir(parents=True, exist_ok=True)
    (OUT / "records" / "base.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["fd"]))


def _dpm_solver_teacher(export: Path, steps: tuple[int, ...]) -> dict[str, list[float]]:
    """The base as the DPM-Solver++(2M) teacher (objective.teacher_sampler = "dpm_solver") at
    each step count, scored as ``e2ed2 evaluate`` scores an export (the same classifier, prompts
    and start noise: the DDIM schedule of as many steps draws it)."""
    import functools

    import torch

    from e2ed2.engine.eval.common import load_export
    from e2ed2.engine.eval.digits import DigitEvaluator, score_networks
    from e2ed2.engine.objectives.teacher import dpm_solver_sample

    torch.set_num_threads(1)
    device = torch.device("cpu")
    config, network, decode = load_export(export, device)
    evaluator = DigitEvaluator(config.data, cache_dir=CLASSIFIER_CACHE)
    fd = {}
    for k in steps:
        scores = score_networks(
            network,
            config,
            decode,
            evaluator,
            num_steps=(k,),
            seeds=SAMPLING_SEEDS,
            device=device,
            solver=functools.partial(dpm_solver_sample, network, config.sampler, k),
        )[str(k)]
        fd[f"dpm_solver:{k}"] = [s["fd"] for s in scores["per_seed"]]
    return fd


def _write_base_export(export: Path, kind: str) -> None:
    """The shipped base as an export folder sampled with ``kind`` (no training)."""
    from e2ed2.engine.config import load_config
    from e2ed2.engine.core.models import build_denoiser
    from e2ed2.engine.data import build_dataloader
    from e2ed2.engine.train.export import write_export

    config = load_config("embedded", [f"sampler.kind={kind}"])
    dataset = build_dataloader(config.data, 1)[0].dataset
    net = build_denoiser(
        config.model,
        latent_channels=dataset.latent_shape[0],
        latent_size=dataset.base_latent_size,
        text_dim=dataset.text_shape[1],
    )
    write_export(export, config, net, net.state_dict())


def cost(steps: int, names: list[str], label: str = "", from_step: int = 0) -> None:
    """CPU seconds per optimizer step of each method, side by side in this one process (one
    thread): the engine's trainers (the preset's K draw) and the consistency distiller, each run
    for ``steps`` steps after one warm-up step, interleaved in rounds so that a change of the
    machine's load hits every method alike."""
    import tempfile

    import torch

    from e2ed2.engine.config import load_config
    from e2ed2.engine.data import batch_conditioning
    from e2ed2.engine.train.trainer import Trainer

    sys.path.insert(0, str(ROOT / "experiments"))
    from consistency_distill import ConsistencyDistiller

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    methods = {}
    for name in names:
        overrides = [f"run.output_dir={tmp / name}", "run.compare_with_base=false"]
        trainer = Trainer(load_config("embedded", overrides + BUDGET_300 + ENGINE_RUNS[name]))
        # Timing a later phase of the run (a weight schedule's ramped part): the step counter
        # drives the schedules and the K draw, nothing else the cost depends on.
        trainer.step = from_step
        batches = iter(trainer.loader)
        methods[name] = lambda t=trainer, b=batches: t.train_step(b)
    config = load_config("embedded", ["sampler.kind=lcm"])
    cd_trainer = Trainer(load_config("embedded", [f"run.output_dir={tmp / 'cd'}"]))
    distiller = ConsistencyDistiller(copy_module(cd_trainer.engine.module), config.sampler, lr=3e-4)
    g = torch.Generator().manual_seed(0)
    cd_batches = iter(cd_trainer.loader)

    def cd_step() -> None:
        batch = next(cd_batches)
        distiller.step(batch.latents.float(), batch_conditioning(batch), g)

    methods["cd"] = cd_step
    seconds = {name: 0.0 for name in methods}
    for step in methods.values():
        step()  # warm-up
    # The trainers draw K from the step number: the same K sequence for each engine method.
    for _ in range(steps):
        for name, step in methods.items():
            started = time.process_time()
            step()
            seconds[name] += time.process_time() - started
    per_step = {name: value / steps for name, value in seconds.items()}
    result = {
        "steps": steps,
        "from_step": from_step,
        "threads": torch.get_num_threads(),
        "cpu_s_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "ratio_to_cd": {k: round(v / per_step["cd"], 2) for k, v in per_step.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / (f"cost_{label}.json" if label else "cost.json")).write_text(
        json.dumps(result, indent=2) + "\n"
    )
    print(json.dumps(result))


def copy_module(module):
    import copy

    return copy.deepcopy(module)


def _fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table() -> None:
    """``results.md``: every method at K = 1, 2, 4, mean ± std over fine-tune x sampling seeds,
    and each run's train CPU and wall seconds."""
    records = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "records").glob("*.json"))}
    lines = [
        "| method | fine-tune seeds | FD K=1 | FD K=2 | FD K=4 | train CPU s per run | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    base = records.pop("base", None)
    if base is not None:
        fd = base["fd"]
        for solver, name, steps in (
            ("ddim", "DDIM", 16),
            ("ddim", "DDIM", 32),
            ("dpm_solver", "DPM-Solver++", 8),
            ("dpm_solver", "DPM-Solver++", 12),
            ("dpm_solver", "DPM-Solver++", 16),
        ):
            if f"{solver}:{steps}" in fd:
                cell = _fmt(fd[f"{solver}:{steps}"])
                lines.append(
                    f"| teacher alone (base, {steps}-step {name}; every K) | — | {cell} | {cell} "
                    f"| {cell} | — | — |"
                )
        lines.append(
            "| base, LCM | — | "
            + " | ".join(_fmt(fd[f"lcm:{k}"]) for k in NUM_STEPS)
            + " | — | — |"
        )
    order = [*ENGINE_RUNS, *CD_RUNS]
    names = sorted(
        {r["name"] for r in records.values()},
        key=lambda n: (order.index(n.split("@")[0]), n),
    )
    for name in names:
        group = sorted((r for r in records.values() if r["name"] == name), key=lambda r: r["seed"])
        cells = [_fmt([v for r in group for v in r["fd"][str(k)]]) for k in NUM_STEPS]
        cpu = " / ".join(
            "—" if r["train_cpu_s"] is None else f"{r['train_cpu_s']:.0f}" for r in group
        )
        wall = " / ".join(f"{r['train_wall_s']:.0f}" for r in group if r.get("train_wall_s"))
        seeds = ", ".join(str(r["seed"]) for r in group)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {cpu} | {wall or '—'} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare(name: str, other: str) -> None:
    """``name`` minus ``other`` at each K: paired by fine-tune and sampling seed (the seeds both
    rows have), mean ± std of the differences and how many favour ``name``; and unpaired, the
    difference of the means in units of the pooled spread sqrt((s_a^2 + s_b^2) / 2) of the two
    rows' per-image-set FDs (what the issue's "more than 2 standard deviations" is read as)."""
    records = [json.loads(p.read_text()) for p in sorted((OUT / "records").glob("*.json"))]
    rows = {n: {r["seed"]: r for r in records if r["name"] == n} for n in (name, other)}
    seeds = sorted(set(rows[name]) & set(rows[other]))
    if not seeds:
        raise SystemExit(f"no fine-tune seed has records of both {name!r} and {other!r}")
    result = {"name": name, "other": other, "fine_tune_seeds": seeds, "by_k": {}}
    for k in map(str, NUM_STEPS):
        a = [v for seed in seeds for v in rows[name][seed]["fd"][k]]
        b = [v for seed in seeds for v in rows[other][seed]["fd"][k]]
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        pooled = ((statistics.stdev(a) ** 2 + statistics.stdev(b) ** 2) / 2) ** 0.5
        gap = statistics.mean(a) - statistics.mean(b)
        result["by_k"][k] = {
            "mean": [round(statistics.mean(a), 2), round(statistics.mean(b), 2)],
            "paired_diff": round(statistics.mean(diffs), 2),
            "paired_std": round(statistics.stdev(diffs), 2),
            "pairs_favouring": sum(d < 0 for d in diffs),
            "pairs": len(diffs),
            "pooled_std": round(pooled, 2),
            "gap_in_pooled_std": round(gap / pooled, 2),
        }
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("name")
    one.add_argument("--seed", type=int, default=0)
    sub.add_parser("teacher")
    sub.add_parser("table")
    pair = sub.add_parser("compare")
    pair.add_argument("name")
    pair.add_argument("other")
    costs = sub.add_parser("cost")
    costs.add_argument("--steps", type=int, default=12)
    costs.add_argument(
        "--methods",
        nargs="+",
        default=["start_ddim", "path_lcm", "path_lcm_gan"],
        help="engine runs timed beside the consistency distiller",
    )
    costs.add_argument("--label", default="", help="writes cost_LABEL.json instead of cost.json")
    costs.add_argument(
        "--from-step", type=int, default=0, help="the engine trainers' step counter at the start"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.command == "run":
        run(args.name, args.seed)
    elif args.command == "teacher":
        teacher()
    elif args.command == "cost":
        cost(args.steps, args.methods, args.label, args.from_step)
    elif args.command == "compare":
        compare(args.name, args.other)
    else:
        table()


if __name__ == "__main__":
    main()
