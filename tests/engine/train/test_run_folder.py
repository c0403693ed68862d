"""Checkpoints, output folders and signals through ``e2ed2 train``: every refused start, broken
checkpoint, full disk and signal ends in its exit code and one line naming the file or key, with
no traceback, and leaves what earlier runs wrote as it was (hashed before and after).

One base run (4 steps, checkpoints at 2 and 4) is trained once per module; each test works on
a copy of it. All runs are in this process as a world of one (gloo).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2ed2.engine.config import config_to_toml, load_config
from e2ed2.engine.train.checkpoint import MARKER, verify_checkpoint
from e2ed2.engine.train.distributed import free_port
from e2ed2.engine.train.run_lock import LOCK_FILE, lock_folder

TINY = [
    "model.num_layers=1",
    "model.num_attention_heads=2",
    "model.attention_head_dim=8",
    "data.resolution=8",
    "data.text_dim=16",
    "data.caption_max_tokens=8",
    "trajectory.num_steps=2",
    "run.batch_per_rank=2",
    "run.log_every_steps=1",
    "run.checkpoint_every_steps=2",
    "run.keep_checkpoints=3",
    "run.num_sample_images=0",
    "run.export_at_end=false",
]
STEP2, STEP4 = "checkpoints/step00000002", "checkpoints/step00000004"


@pytest.fixture(scope="module")
def world_of_one():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }.items():
            patch.setenv(key, value)
        yield


def _train(output_dir: Path, *overrides: str) -> int:
    from e2ed2.engine.cli.train import main

    return main(["--config", "scratch", *TINY, f"run.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def base_run(world_of_one: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert _train(out, "run.max_steps=4") == 0
    return out


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _hashes(root: Path, *, lock: bool = False) -> dict[str, str]:
    """Every file's hash; the lock file only with ``lock`` (each start that takes the lock
    writes its own note into it, including a start that is then refused)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (lock or p.name != LOCK_FILE)
    }


def _steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _one_error_line(err: str, *names: str) -> str:
    """The command's own line in stderr (log lines aside), checked for the names."""
    assert "Traceback" not in err, err
    lines = [  # tqdm's progress bar also starts with the program's name
        line for line in err.splitlines() if line.startswith("e2ed2 train:") and "%|" not in line
    ]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _model_file(checkpoint: Path) -> Path:
    return next((checkpoint / checkpoint.name).glob("mp_rank_00_model_states.pt"))


# ----------------------------------------------------------------------------- checkpoints


def test_each_checkpoint_has_a_marker_and_deepspeeds_latest(base_run: Path, tmp_path: Path):
    """COMPLETE lists every file with its size; ``latest`` makes DeepSpeed's bundled
    zero_to_fp32.py work as documented (no --tag) and give the checkpoint's weights."""
    for name in (STEP2, STEP4):
        checkpoint = base_run / name
        files = json.loads((checkpoint / MARKER).read_text())["files"]
        assert files["trainer.json"] == (checkpoint / "trainer.json").stat().st_size
        assert f"{checkpoint.name}/mp_rank_00_model_states.pt" in files
        assert (checkpoint / "latest").read_text() == checkpoint.name
        assert verify_checkpoint(checkpoint) is None
    checkpoint = base_run / STEP4
    done = subprocess.run(
        [sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (converted,) = tmp_path.glob("pytorch_model*.bin")
    weights = torch.load(converted, weights_only=True)
    module = torch.load(_model_file(checkpoint), weights_only=False)["module"]
    assert weights.keys() == module.keys() and len(weights) > 10
    for key, value in module.items():
        torch.testing.assert_close(weights[key], value.float(), rtol=0, atol=0)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: _truncate(_model_file(c)), "mp_rank_00_model_states.pt has"),
        (lambda c: (c / "trainer.json").write_text("{garbage"), "trainer.json"),
        (lambda c: (c / "rank00000.safetensors").write_bytes(b"\0" * 8), "rank00000.safetensors"),
        (lambda c: shutil.rmtree(c / c.name), "mp_rank_00_model_states.pt is missing"),
        (lambda c: (c / MARKER).unlink(), "COMPLETE is missing"),
    ],
    ids=["truncated-model", "garbage-json", "corrupt-ema", "missing-tag-folder", "no-marker"],
)
def test_verify_names_the_broken_file(base_run: Path, tmp_path: Path, damage, named: str):
    checkpoint = tmp_path / "step00000004"
    shutil.copytree(base_run / STEP4, checkpoint)
    assert verify_checkpoint(checkpoint) is None
    damage(checkpoint)
    problem = verify_checkpoint(checkpoint)
    assert problem is not None and named in problem, problem


def test_a_broken_newest_checkpoint_falls_back_to_the_previous(
    run_copy: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
):
    """A truncated model file in step 4 and an empty folder named step 9: both are set aside
    with a warning naming them, the run resumes from step 2, and step 2 is untouched."""
    _truncate(_model_file(run_copy / STEP4))
    (run_copy / "checkpoints" / "step00000009").mkdir()
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tot')  # torn by the kill
    step2 = _hashes(run_copy / STEP2)
    broken = _hashes(run_copy / STEP4)
    assert _train(run_copy, "run.max_steps=4") == 0
    assert "Traceback" not in capsys.readouterr().err
    assert "step00000009/COMPLETE is missing" in caplog.text
    assert "mp_rank_00_model_states.pt has" in caplog.text
    assert "metrics.jsonl line 5 is not a JSON record" in caplog.text
    assert _hashes(run_copy / STEP2) == step2
    (aside,) = (run_copy / "checkpoints").glob("corrupt-step00000004-*")
    assert _hashes(aside) == broken
    assert _steps(run_copy) == [1, 2, 3, 4]
    assert verify_checkpoint(run_copy / STEP4) is None


def test_no_usable_checkpoint_is_refused_and_nothing_changes(
    run_copy: Path, capsys: pytest.CaptureFixture
):
    _truncate(_model_file(run_copy / STEP4))
    (run_copy / STEP2 / "trainer.json").write_text("[")
    before = _hashes(run_copy)
    assert _train(run_copy, "run.max_steps=6") == 2
    _one_error_line(capsys.readouterr().err, "no usable checkpoint", "step00000002", "trainer.json")
    assert _hashes(run_copy) == before


def test_resume_from_an_older_step_sets_the_newer_ones_aside(run_copy: Path):
    before = _hashes(run_copy)
    assert _train(run_copy, "run.max_steps=3", "run.resume_from=2") == 0
    (aside,) = (run_copy / "checkpoints").glob("superseded-*")
    assert _hashes(aside / "step00000004") == {
        k.removeprefix(f"{STEP4}/"): v for k, v in before.items() if k.startswith(STEP4)
    }
    assert _hashes(aside)["metrics.jsonl"] == before["metrics.jsonl"]
    assert _steps(run_copy) == [1, 2, 3]
    assert _hashes(run_copy / STEP2) == {
        k.removeprefix(f"{STEP2}/"): v for k, v in before.items() if k.startswith(STEP2)
    }


def test_a_full_disk_during_a_save_says_so_and_removes_the_partial_save(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from e2ed2.engine.train import checkpoint as checkpoint_module

    def full(tensors: object, filename: str, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    before = _hashes(run_copy / "checkpoints")
    assert _train(run_copy, "run.max_steps=6") == 1
    line = _one_error_line(
        capsys.readouterr().err, "disk is full (ENOSPC)", "rank00000.safetensors"
    )
    assert "checkpoint step 6 was not saved" in line
    assert _hashes(run_copy / "checkpoints") == before  # no .tmp- left, nothing changed
    assert _steps(run_copy)[:4] == [1, 2, 3, 4]


def _torch_short_write_error(path: Path) -> RuntimeError:
    """What torch's own checkpoint writer raises when the disk takes fewer bytes than it
    writes (a full disk), produced for real under a 512-byte file-size limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))
    try:
        torch.save(torch.zeros(4096), path)
    except RuntimeError as err:
        return err
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    raise AssertionError("torch.save wrote past the file-size limit")


def test_a_full_disk_inside_torchs_writer_is_a_full_disk_stop_then_and_on_the_rerun(
    run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """torch.save (DeepSpeed's files, the RNG state) reports a full disk as ``RuntimeError:
    ... unexpected pos ...``: the run stops with the full-disk message (exit 1), not as a bug,
    and so does the rerun on the still-full disk; the checkpoints stay as they were."""
    error = _torch_short_write_error(tmp_path / "probe.pt")
    assert "unexpected pos" in str(error)

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError(str(error))

    monkeypatch.setattr(torch, "save", full)
    before = _hashes(run_copy / "checkpoints")
    for _ in ("first failure", "rerun on the still-full disk"):
        assert _train(run_copy, "run.max_steps=6") == 1
        line = _one_error_line(capsys.readouterr().err, "disk is full (ENOSPC)", "unexpected pos")
        assert "stopped" in line and "checkpoint step 6 was not saved" in line
        assert "internal error" not in line
        assert _hashes(run_copy / "checkpoints") == before  # no .tmp- left, nothing changed


def test_a_full_disk_outside_a_save_ends_as_a_full_disk_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    """The command boundary: torch's short-write error and safetensors' full-disk error
    anywhere (an export, a sample) are the full-disk stop too; another RuntimeError stays an
    internal error."""
    from e2ed2.engine.cli.boundary import run_command

    error = _torch_short_write_error(tmp_path / "probe.pt")

    def fail(args: list[str]) -> int:
        raise error

    assert run_command("e2ed2 sample", fail, []) == 1
    assert capsys.readouterr().err.startswith("e2ed2 sample: stopped: the disk is full (ENOSPC)")

    from safetensors import SafetensorError

    def safetensors_full(args: list[str]) -> int:  # its message on a full tmpfs, verbatim
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    assert run_command("e2ed2 sample", safetensors_full, []) == 1
    assert "stopped: the disk is full (ENOSPC)" in capsys.readouterr().err

    def bug(args: list[str]) -> int:
        raise RuntimeError("something else")

    assert run_command("e2ed2 sample", bug, []) == 1
    assert "internal error" in capsys.readouterr().err


# -------------------------------------------------------------------------- output folders


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["sampler.kind=ddim"], ["sampler.kind: checkpoint 'lcm', config 'ddim'"]),
        (["objective.kind=diffusion"], ["objective.kind: checkpoint 'e2ed2'"]),
        (["run.precision=bf16"], ["run.precision"]),
        (["run.deepspeed_config=zero3"], ["zero_optimization.stage: checkpoint 2, config 3"]),
        (["run.resume=false"], ["already holds a run", "run.overwrite=true"]),
    ],
    ids=["sampler", "objective", "precision", "zero-stage", "resume-false"],
)
def test_a_start_that_would_mix_runs_is_refused_before_writing(
    run_copy: Path, capsys: pytest.CaptureFixture, overrides: list[str], names: list[str]
):
    before = _hashes(run_copy)
    assert _train(run_copy, "run.max_steps=6", *overrides) == 2
    _one_error_line(capsys.readouterr().err, *names)
    assert _hashes(run_copy) == before  # config.toml included


def test_overwrite_moves_the_old_run_aside(run_copy: Path):
    before = _hashes(run_copy)
    assert _train(run_copy, "run.max_steps=1", "run.overwrite=true") == 0
    (aside,) = run_copy.parent.glob("run.replaced-*")
    assert _hashes(aside) == before
    assert _steps(run_copy) == [1]
    assert [p.name for p in (run_copy / "checkpoints").iterdir()] == ["step00000001"]


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_duplicates(
    tmp_path: Path, world_of_one: None, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "run"
    out.mkdir()
    config = load_config(None, [*TINY, f"run.output_dir={out}", "run.max_steps=2"])
    (out / "config.toml").write_text(config_to_toml(config))
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert _train(out, "run.max_steps=2") == 0
    assert _steps(out) == [1, 2]
    assert "line 3 is not a JSON record" in caplog.text


def test_another_runs_folder_without_checkpoints_is_refused(
    tmp_path: Path, world_of_one: None, capsys: pytest.CaptureFixture
):
    out = tmp_path / "run"
    out.mkdir()
    other = load_config(None, [*TINY, f"run.output_dir={out}", "model.num_layers=3"])
    (out / "config.toml").write_text(config_to_toml(other))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _hashes(out)
    assert _train(out, "run.max_steps=2") == 2
    _one_error_line(capsys.readouterr().err, "holds another run", "model.num_layers")
    assert _hashes(out) == before


# ------------------------------------------------------------------ one writer per folder


def _wait_for(condition, what: str, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_holder_never_blocks(
    run_copy: Path, world_of_one: None, capsys: pytest.CaptureFixture
):
    """A real `e2ed2 train` resumes the run and is frozen (SIGSTOP) mid-run; a second one on the
    same folder exits 2 naming the first's pid, host and start time, and changes no file
    (the lock file included). After the first is SIGKILLed, its lock file stays but no longer
    blocks: the next run resumes and finishes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    first = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "e2ed2"),
            "train",
            "--config",
            "scratch",
            *TINY,
            f"run.output_dir={run_copy}",
            "run.max_steps=100000",
            "run.checkpoint_every_steps=100000",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Training: past the resume at step 4 (metrics.jsonl was cut back to 4 lines).
        _wait_for(lambda: len(_steps(run_copy)) > 5, "the first run to train")
        os.kill(first.pid, signal.SIGSTOP)
        note = json.loads((run_copy / LOCK_FILE).read_text())
        assert note["pid"] == first.pid
        before = _hashes(run_copy, lock=True)
        assert _train(run_copy, "run.max_steps=6") == 2
        line = _one_error_line(
            capsys.readouterr().err,
            f"run.output_dir='{run_copy}' is in use",
            f"pid {first.pid} on host {note['host']}, started {note['started']}",
        )
        assert "e2ed2 train" in line
        assert _hashes(run_copy, lock=True) == before
    finally:
        first.kill()
        first.wait()
    assert (run_copy / LOCK_FILE).is_file()  # left behind by the killed run
    assert _train(run_copy, "run.max_steps=6") == 0
    assert _steps(run_copy) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_copy / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_follows_the_run_folder_and_a_refused_new_folder_is_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    """run.overwrite's move keeps the held lock at run.output_dir; a start refused before it
    writes leaves no folder it created; precompute refuses a locked OUT_DIR by name."""
    from e2ed2.engine.cli.main import main
    from e2ed2.engine.train.run_dir import StartPlan, apply_start

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.toml").write_text("old")
    with lock_folder(out, "run.output_dir", "test") as lock:
        aside = tmp_path / "run.replaced-x"
        apply_start(StartPlan(moves=[(out, aside)]), out)
        assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "config.toml"]
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()} on host"):
            lock_folder(out, "run.output_dir", "second")  # the moved-back file is still held
        assert lock.locked
    new = tmp_path / "new" / "run"
    lock_folder(new, "run.output_dir", "test").release()
    assert not new.exists()  # created by the lock, holding nothing else: removed again
    shards = tmp_path / "shards"
    with lock_folder(shards, "OUT_DIR", "e2ed2 precompute"):
        argv = [str(tmp_path), str(shards), "--vae", "v", "--text-encoder", "t"]
        assert main(["precompute", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"OUT_DIR='{shards}' is in use by another process (e2ed2 precompute, pid" in err
    assert not shards.exists()


# --------------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("signum", "overrides", "code", "checkpointed"),
    [
        (signal.SIGTERM, [], 143, True),
        (signal.SIGINT, ["run.signal_checkpoint_min_steps=0"], 130, False),
    ],
    ids=["sigterm-checkpoints", "sigint-no-checkpoint"],
)
def test_a_signal_finishes_the_step_and_exits_with_its_code(
    tmp_path: Path,
    world_of_one: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    signum: int,
    overrides: list[str],
    code: int,
    checkpointed: bool,
):
    from e2ed2.engine.train.trainer import Trainer

    original = Trainer.train_step

    def signalled(self, batches):  # the signal arrives in the middle of step 3
        if self.step + 1 == 3:
            os.kill(os.getpid(), signum)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    assert _train(out, "run.max_steps=6", "run.checkpoint_every_steps=1000", *overrides) == code
    line = _one_error_line(capsys.readouterr().err, signal.Signals(signum).name, "after step 3")
    assert _steps(out) == [1, 2, 3]
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    if checkpointed:
        assert checkpoints == ["step00000003"] and "step00000003 written" in line
        assert verify_checkpoint(out / "checkpoints" / "step00000003") is None
    else:
        assert checkpoints == [] and "no checkpoint written" in line
    # The handlers are restored: SIGTERM outside a command is what it was.
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_field_added_after_the_checkpoint_is_accepted_only_at_its_default() -> None:
    """A checkpoint written before a config field existed resumes while the field keeps its
    default (the old behaviour); a set value is a difference, named."""
    from e2ed2.engine.train.fingerprint import fingerprint_differences, run_fingerprint

    saved = json.loads(json.dumps(run_fingerprint(load_config(None), 2)))
    del saved["objective"]["l1_weight"]
    assert fingerprint_differences(run_fingerprint(load_config(None), 2), saved) == []
    changed = run_fingerprint(load_config(None, ["objective.l1_weight=0.5"]), 2)
    assert fingerprint_differences(changed, saved) == [
        "objective.l1_weight: checkpoint '(absent)', config 0.5"
    ]
