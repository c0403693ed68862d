"""optim.lr_schedule = "cosine": DeepSpeed's WarmupCosineLR from lr down to min_lr_ratio x lr at
the run's last step (run.max_steps), with or without a warmup."""

from __future__ import annotations

import pytest

from e2ed2.engine.config import ConfigError, load_config
from e2ed2.engine.config.optim import OptimConfig
from e2ed2.engine.train.distributed import build_ds_config


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_cosine_ends_at_the_floor_on_the_last_step(tiny_run, warmup_steps: int) -> None:
    """The rate each logged step sets for the next: without a warmup it starts at lr, with one it
    rises towards lr; then it falls every step to min_lr_ratio x lr by step run.max_steps. (As
    with DeepSpeed's WarmupLR, the very first step trains at rate 0: its schedulers start so.)"""
    from e2ed2.engine.train.trainer import Trainer

    config = load_config(
        None,
        [
            *tiny_run,
            "trajectory.num_steps=1",
            "optim.lr=1e-3",
            "run.max_steps=9",
            "optim.lr_schedule=cosine",
            "optim.min_lr_ratio=0.1",
            f"optim.warmup_steps={warmup_steps}",
        ],
    )
    lrs = [record["lr"] for record in Trainer(config).train()]
    assert len(lrs) == 9
    assert lrs[-1] == pytest.approx(1e-4)
    peak = lrs.index(max(lrs))
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1 :], strict=True))
    assert lrs[-2] > lrs[-1]
    if warmup_steps:
        assert lrs[0] == 0 and peak == warmup_steps and max(lrs) < 1e-3
        return
    # No warmup: held at lr for DeepSpeed's two-step minimum warmup, then a half cosine, whose
    # values at progress p and 1 - p sum to lr + floor.
    assert lrs[:2] == pytest.approx([1e-3, 1e-3])
    decay = lrs[1:]
    for j in range(len(decay)):
        assert decay[j] + decay[-1 - j] == pytest.approx(1.1e-3)


def test_the_schedule_is_checked_and_needs_the_run_length() -> None:
    with pytest.raises(ValueError, match="optim.lr_schedule='linear' is not one of"):
        OptimConfig(lr_schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optim.min_lr_ratio must be in"):
        OptimConfig(lr_schedule="cosine", min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="applies to lr_schedule='cosine'"):
        OptimConfig(min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="needs the run's length"):
        build_ds_config(
            "none",
            batch_per_rank=1,
            grad_accum_steps=1,
            world_size=1,
            optim=OptimConfig(lr_schedule="cosine"),
            precision="fp32",
        )
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        load_config(None, ["optim.lr_schedule=step"])
