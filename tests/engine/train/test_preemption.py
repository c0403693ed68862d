"""Preemption and a failed rank through ``e2ed2 launch`` (the real ``deepspeed`` launcher) on 2 CPU
ranks (gloo).

One run folder, three launches and a reference: SIGTERM to the launcher mid-run checkpoints the
current step on both ranks and exits 143; the rerun with rank 1's write inside DeepSpeed's own
save failing (``E2ED2_FAIL_SAVE_RANK=1``) ends with exit 1 naming rank 1 instead of hanging, and
changes no checkpoint; the plain rerun resumes and logs exactly what an uninterrupted run at the
same global batch logs (one process, batch 4).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from e2ed2.engine.train.checkpoint import CheckpointStore, verify_checkpoint
from e2ed2.engine.train.distributed import free_port
from e2ed2.engine.train.write_errors import FAIL_SAVE_ENV

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = [
    "--config",
    "scratch",
    "model.num_layers=2",
    "run.batch_per_rank=2",
    "run.log_every_steps=1",
    "run.sample_every_steps=1000",
    "run.num_sample_images=0",
    "run.export_at_end=false",
    "trajectory.num_steps=4",
    "trajectory.checkpoint=step",
    "run.checkpoint_every_steps=1000",
]


def _launch(output_dir: Path, *overrides: str) -> list[str]:
    return [
        str(BIN / "e2ed2"),
        "launch",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--",
        f"run.output_dir={output_dir}",
        *TINY,
        *overrides,
    ]


def _metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {r["step"]: r for r in map(json.loads, lines)}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sigterm_to_the_launcher_checkpoints_every_rank_and_a_failed_save_ends_the_run(
    tmp_path: Path, launcher_env: dict[str, str], run_checked: Callable[..., str]
) -> None:
    out, log = tmp_path / "run", tmp_path / "launch.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(
            _launch(out, "run.max_steps=100000"),
            env=launcher_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 600
            while len(_metrics(out)) < 2:  # both ranks are in the loop
                assert launcher.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the run never reached step 2"
                time.sleep(0.5)
            launcher.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler does
            code = launcher.wait(timeout=300)
        finally:
            launcher.kill()
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "SIGTERM: forwarded to ranks [0, 1]" in text
    (checkpoint,) = CheckpointStore(out / "checkpoints", rank=0, world_size=2, keep=1).complete()
    step = CheckpointStore.read_state(checkpoint)["step"]
    assert text.count(f"interrupted (SIGTERM): stopped after step {step}: checkpoint") == 2
    assert verify_checkpoint(checkpoint) is None
    assert {p.name for p in checkpoint.glob("rank*.state.pt")} == {
        "rank00000.state.pt",
        "rank00001.state.pt",
    }
    assert sorted(_metrics(out)) == list(range(1, step + 1))
    before = _hashes(out / "checkpoints")

    # Rank 1's first write inside DeepSpeed's save fails while rank 0 waits in that save's
    # barrier: the run ends (no hang: the timeout would fire), exit 1, rank 1 named.
    end = f"run.max_steps={step + 2}"
    failed = subprocess.run(
        _launch(out, end),
        env={**launcher_env, FAIL_SAVE_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = failed.stdout + failed.stderr
    assert failed.returncode == 1, text[-3000:]
    assert "e2ed2 launch: rank 1 exited 1" in text
    assert f"checkpoint step {step + 2} was not saved: rank 1 of 2" in text
    assert "injected write failure" in text
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    published = {k: v for k, v in _hashes(out / "checkpoints").items() if ".tmp-" not in k}
    assert published == before

    resumed = run_checked(_launch(out, end))
    assert f"at step {step}" in resumed and "resumed from" in resumed
    reference = tmp_path / "reference"
    run_checked(
        [
            str(BIN / "e2ed2"),
            "train",
            f"run.output_dir={reference}",
            *TINY,
            "run.batch_per_rank=4",
            end,
        ]
    )
    got, ref = _metrics(out), _metrics(reference)
    assert sorted(got) == sorted(ref) == list(range(1, step + 3))
    for at in ref:
        assert got[at]["total"] == pytest.approx(ref[at]["total"], rel=1e-5), at


def test_launch_refuses_what_it_cannot_run_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """No `--` between the launcher's and train's arguments, or an option e2ed2 launch sets
    itself: exit 2 and one line, before any process starts."""
    from e2ed2.engine.cli.main import main

    assert main(["launch", "--num_gpus", "2", "--config", "scratch"]) == 2
    assert "no `--` between the launcher's and train's arguments" in capsys.readouterr().err
    assert main(["launch", "--module", "x", "--", "--config", "scratch"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "e2ed2 launch: error: --module is set by e2ed2 launch; remove it"
