"""The whole-step estimate (train/step_estimate.py) against a real CPU step, its table and its
refusal, and `e2ed2 estimate` on the command line."""

from __future__ import annotations

from pathlib import Path

from e2ed2.engine.config import load_config
from e2ed2.engine.core.memory import LiveTensorTracker
from e2ed2.engine.train.step_estimate import check_fits, estimate_step, format_estimate


def _every_term(tmp_path: Path) -> list[str]:
    """The embedded digits with every objective term on: LPIPS, pixel-space energy over m = 2,
    the digit reward, the noise-paired teacher (the preset's), the GAN, EMA; ZeRO off."""
    from e2ed2.engine.objectives.reward import DigitRewardMLP, save_reward_model

    reward = tmp_path / "reward.safetensors"
    save_reward_model(DigitRewardMLP(), reward)
    return [
        f"run.output_dir={tmp_path / 'run'}",
        "run.deepspeed_config=none",
        "run.batch_per_rank=4",
        "run.num_sample_images=0",
        "run.compare_with_base=false",
        "run.export_at_end=false",
        "trajectory.num_steps=2",
        "trajectory.num_steps_choices=[]",
        "objective.teacher_steps=2",
        "trajectory.samples_per_prompt=2",
        "objective.l2_weight=1.0",
        "objective.lpips_weight=1.0",
        "objective.lpips_random_backbone=true",
        "objective.energy_weight=1.0",
        "objective.energy_space=pixels",
        "objective.reward_weight=0.1",
        f"objective.reward_path={reward}",
        "gan.enabled=true",
    ]


def test_estimate_matches_a_real_cpu_step_with_every_term(world_of_one, tmp_path: Path) -> None:
    """The fake-tensor estimate's phase peak is within 3% of the live bytes a real Trainer step
    allocates (its second step: the optimizer state exists from the first, as the estimate's
    resident terms; the tracker counts what the step itself allocates)."""
    from e2ed2.engine.train.trainer import Trainer

    config = load_config("embedded", _every_term(tmp_path))
    estimate = estimate_step(config, world_size=1, alone_lines=False)
    trainer = Trainer(config)
    batches = iter(trainer.loader)
    trainer.train_step(batches)
    with LiveTensorTracker(track_cuda=False) as tracker:
        trainer.train_step(batches)
    real = tracker.report().peak_bytes
    print(f"whole-step estimate {estimate.measured_peak_bytes} B, real step {real} B")
    assert abs(estimate.measured_peak_bytes - real) <= 0.03 * real, (
        estimate.measured_peak_bytes,
        real,
    )


def test_table_lines_peak_and_refusal(tmp_path: Path) -> None:
    """One line per term, the peak is the max over the phases (not their sum), and a device
    memory below it is refused naming the largest terms and the keys that cut them."""
    cheap = ["trajectory.num_steps=1", "objective.teacher_steps=1", "run.batch_per_rank=1"]
    config = load_config("embedded", _every_term(tmp_path) + cheap)
    estimate = estimate_step(config, world_size=2)
    table = format_estimate(estimate)
    for label in (
        "ZeRO-0 state",
        "EMA shadow",
        "frozen teacher weights",
        "frozen LPIPS network weights",
        "LPIPS, added to the unroll's peak",
        "digit reward",
        "energy score over m=2",
        "GAN generator term",
        "teacher sampling",
        "discriminator update",
        "peak (max over the phases",
    ):
        assert label in table, label
    phases = [estimate.phase_device_bytes(p) for p in estimate.phases]
    assert len(phases) == 2 and estimate.peak_device_bytes == max(phases)
    assert estimate.peak_device_bytes < sum(phases)
    gib = estimate.peak_device_bytes / 2**30
    assert check_fits(estimate, gib / 0.92 * 1.01) is None
    refusal = check_fits(estimate, gib)
    assert refusal is not None and "largest terms" in refusal and "cut by" in refusal


def test_estimate_command_refuses_a_config_over_the_device_memory(capsys) -> None:
    from e2ed2.engine.cli.main import main

    cheap = [
        "trajectory.num_steps=1",
        "trajectory.num_steps_choices=[]",
        "objective.teacher_steps=1",
    ]
    assert main(["estimate", "--config", "embedded", *cheap, "run.device_memory_gib=0.001"]) == 2
    captured = capsys.readouterr()
    assert "peak (max over the phases, not their sum)" in captured.out
    assert "config error: the whole step needs" in captured.err
    assert "run.batch_per_rank" in captured.err


def test_estimate_command_rejects_a_bad_world_size() -> None:
    from e2ed2.engine.cli.main import main

    assert main(["estimate", "--world-size", "0"]) == 2
