"""Resuming on another number of ranks (ZeRO-3 with every parameter partitioned, the real
``deepspeed`` launcher on 2 CPU ranks): a checkpoint of 2 ranks x batch 2 resumes on 1 rank x
batch 4 and one of 1 x 4 on 2 x 2; both runs log exactly the losses of an uninterrupted run at
that global batch (the optimizer state and the data position carried over) and end with its EMA
(the ZeRO-3 EMA partitions resharded)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = [
    "--config",
    "scratch",
    "model.num_layers=2",
    "run.log_every_steps=1",
    "run.sample_every_steps=1000",
    "run.num_sample_images=0",
    "run.export_at_end=false",
    "trajectory.num_steps=4",
    "trajectory.checkpoint=step",
    "run.checkpoint_every_steps=2",
    "run.keep_checkpoints=2",
    "optim.lr=1e-3",
]


def _losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["total"] for r in map(json.loads, lines)}


def test_a_checkpoint_resumes_on_another_number_of_ranks_at_the_same_global_batch(
    tmp_path: Path,
    run_checked: Callable[..., str],
    deepspeed_command: Callable[..., list[str]],
    zero3_partition_everything: str,
) -> None:
    zero3 = f"run.deepspeed_config={zero3_partition_everything}"

    def one_rank(out: Path, *overrides: str) -> str:
        args = [f"run.output_dir={out}", *TINY, zero3, "run.batch_per_rank=4", *overrides]
        return run_checked([str(BIN / "e2ed2"), "train", *args])

    def two_ranks(out: Path, *overrides: str) -> str:
        args = [f"run.output_dir={out}", *TINY, zero3, "run.batch_per_rank=2", *overrides]
        return run_checked(deepspeed_command("--module", "e2ed2.engine.cli.train", *args))

    straight = tmp_path / "straight"
    one_rank(straight, "run.max_steps=4")
    reference = _losses(straight)
    assert sorted(reference) == [1, 2, 3, 4]

    down = tmp_path / "two-to-one"
    two_ranks(down, "run.max_steps=2")
    out = one_rank(down, "run.max_steps=4")
    assert "written by another number of ranks" in out and "at step 2" in out

    up = tmp_path / "one-to-two"
    shutil.copytree(straight, up)
    out = two_ranks(up, "run.max_steps=4", "run.resume_from=2")
    assert "written by another number of ranks" in out and "at step 2" in out

    for got in (_losses(down), _losses(up)):
        assert sorted(got) == [1, 2, 3, 4]
        for step, loss in reference.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (step, got, reference)
    # The losses move (not a comparison of constants).
    assert len({round(v, 6) for v in reference.values()}) == 4
    # The EMA (decay 0.95: it lags the weights) of step 4, as each checkpoint's export holds it.
    ema = "checkpoints/step00000004/export/transformer/diffusion_pytorch_model.safetensors"
    want = load_file(straight / ema)
    for run in (down, up):
        got = load_file(run / ema)
        assert got.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6)


def test_another_global_batch_on_another_number_of_ranks_is_refused(tmp_path: Path) -> None:
    """Refused before anything is built, naming both global batches (no launcher needed: the
    plan reads the checkpoint's trainer.json only)."""
    from e2ed2.engine.config import ConfigError, load_config
    from e2ed2.engine.train.fingerprint import run_fingerprint
    from e2ed2.engine.train.run_dir import plan_start

    config = load_config("scratch", [f"run.output_dir={tmp_path}", "run.batch_per_rank=2"])
    fingerprint = json.loads(json.dumps(run_fingerprint(config, 2)))
    checkpoint = tmp_path / "checkpoints" / "step00000002"
    checkpoint.mkdir(parents=True)
    state = {"step": 2, "world_size": 2, "train_batch_size": 4, "fingerprint": fingerprint}
    (checkpoint / "trainer.json").write_text(json.dumps(state))
    (checkpoint / "COMPLETE").write_text(json.dumps({"step": 2, "files": {}}))
    with pytest.raises(ConfigError, match="global batch of 4; this run has 1 ranks x .* = 2"):
        plan_start(config, run_fingerprint(config, 2), world_size=1)
    plan = plan_start(config, run_fingerprint(config, 2), world_size=2)
    assert plan.checkpoint == checkpoint and plan.universal is None
