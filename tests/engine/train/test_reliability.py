"""Reliability: bad configs fail early by key, bad data is skipped and counted, NaN/Inf steps are
skipped (and stop the run when they persist), checkpoints load without unpickling code.

The trainer tests run in this process as a world of one (gloo), except the one that starts the
real launcher on 2 ranks (marked slow); the SIGKILL crash/resume test is in test_crash_resume.py.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from e2ed2.engine.config.base import ConfigError
from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.config.loader import load_config
from e2ed2.engine.core.faults import FAULTS_ENV
from e2ed2.engine.data.shards import INDEX_FORMAT, INDEX_VERSION, LatentShardDataset
from e2ed2.engine.train.launch import check_launch

ENGINE = Path(__file__).parents[3] / "engine"
# A trainer that builds in seconds: 1 block, 8x8 digits, K = 2.
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
    "run.checkpoint_every_steps=1000",
    "run.num_sample_images=0",
    "run.export_at_end=false",
]


def _trainer(output_dir: Path, *overrides: str):
    from e2ed2.engine.train.trainer import Trainer

    return Trainer(load_config(None, [*TINY, f"run.output_dir={output_dir}", *overrides]))


def _local_weights(trainer) -> list[torch.Tensor]:
    """This rank's copy of every trained parameter (its ZeRO-3 partition, else the whole)."""
    return [getattr(p, "ds_tensor", p).detach().clone() for p in trainer.engine.module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------ 1. checkpoints


class _FakeEngine:
    def train_batch_size(self) -> int:
        return 2

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        (Path(root) / tag).mkdir()
        (Path(root) / tag / "model_states.pt").write_bytes(b"weights")


class _Tensors:
    def __init__(self, value: float) -> None:
        self.value = value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.full((2,), self.value)}


def test_checkpoints_are_published_whole_and_the_last_n_kept(tmp_path: Path) -> None:
    from e2ed2.engine.train.checkpoint import CheckpointStore, ProcessRng
    from e2ed2.engine.train.checkpointed import DeepSpeedEngineState, RankPrivate, RankTensors

    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep=2)
    # What crashes leave behind (a save, a deletion) carries no complete name: never resumed.
    (tmp_path / ".tmp-step00000009").mkdir(parents=True)
    (tmp_path / ".old-step00000001").mkdir()
    assert store.latest() is None

    def save(step: int, **kwargs: object) -> Path:
        return store.save(
            step,
            {
                "model": DeepSpeedEngineState(_FakeEngine()),
                "ema": RankTensors(_Tensors(float(step)), torch.nn.Module(), label="EMA"),
                "rng": RankPrivate(ProcessRng()),
            },
            **kwargs,
        )

    for step in (2, 4, 6):
        save(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004", "step00000006"]
    assert store.latest() == tmp_path / "step00000006"
    assert CheckpointStore.read_state(store.latest()) == {
        "step": 6,
        "train_batch_size": 2,
        "world_size": 1,
    }

    def killed(staging: Path) -> None:  # dies after the engine and EMA files are written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save(8, write_extra=killed)
    assert (tmp_path / ".tmp-step00000008" / "rank00000.safetensors").is_file()
    assert store.latest() == tmp_path / "step00000006"
    save(10)  # the next save clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000006", "step00000010"]


# ------------------------------------------------------------------------------ 3. bad config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.max_step=5"], r"unknown key 'run\.max_step' \(did you mean 'run\.max_steps'\?\)"),
        (["runn.max_steps=5"], r"unknown section 'runn' \(did you mean 'run'\?\).*allowed"),
        (["run.batch_per_rank=two"], r"run\.batch_per_rank='two' has type str, expected int"),
        (["run.precision=fp8"], r"run\.precision='fp8' is not one of \['fp32', 'bf16', 'fp16'\]"),
        (["trajectory.num_steps=0"], r"trajectory\.num_steps must be >= 1, got 0"),
        (["run.max_consecutive_nonfinite_steps=0"], r"run\.max_consecutive_nonfinite_steps"),
        (["data.max_bad_sample_fraction=1.5"], r"data\.max_bad_sample_fraction .*\[0, 1\]"),
        (
            [
                "data.source=shards",
                "data.shard_dir=/data/x",
                "objective.lpips_weight=1.0",
                "objective.lpips_random_backbone=true",
            ],
            r"LPIPS / GAN on latent shards need a decoder: set model\.vae_path",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    assert re.search(message, str(raised.value)), str(raised.value)
    assert "\n" not in str(raised.value)


def _ds_json(tmp_path: Path, **keys: object) -> str:
    config = json.loads((ENGINE.parent / "ds_configs" / "zero3.json").read_text())
    config.update(keys)
    path = tmp_path / "zero3_custom.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_deepspeed_json_and_local_paths_are_checked_at_launch(tmp_path: Path) -> None:
    micro = load_config(
        None,
        [
            "run.batch_per_rank=2",
            f"run.deepspeed_config={_ds_json(tmp_path, train_micro_batch_size_per_gpu=4)}",
        ],
    )
    with pytest.raises(
        ConfigError,
        match=r"train_micro_batch_size_per_gpu=4 disagrees with run\.batch_per_rank = 2",
    ):
        check_launch(micro, world_size=2)
    odd = load_config(None, [f"run.deepspeed_config={_ds_json(tmp_path, train_batch_size=7)}"])
    with pytest.raises(ConfigError, match=r"train_batch_size=7 \(not divisible by 2 ranks"):
        check_launch(odd, world_size=2)
    with pytest.raises(ConfigError, match=r"run\.deepspeed_config='zero4'.*shipped: \["):
        check_launch(load_config(None, ["run.deepspeed_config=zero4"]), world_size=1)

    missing = tmp_path / "no-such-model"
    config = load_config(None, [f"model.pretrained_path={missing}"])
    with pytest.raises(
        ConfigError,
        match=rf"model\.pretrained_path='{missing}' does not exist; expected a diffusers model folder \(config\.json \+ \*\.safetensors",
    ):
        check_launch(config, world_size=1)
    pickled = tmp_path / "pickled" / "transformer"
    pickled.mkdir(parents=True)
    (pickled / "config.json").write_text("{}")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    config = load_config(None, [f"model.pretrained_path={pickled.parent}"])
    with pytest.raises(ConfigError, match=r"has config\.json but no \*\.safetensors weights"):
        check_launch(config, world_size=1)
    config = load_config(
        None,
        [
            "objective.lpips_weight=1.0",
            f"objective.lpips_backbone_path={tmp_path / 'vgg.pth'}",
        ],
    )
    with pytest.raises(
        ConfigError,
        match=r"lpips_backbone_path=.*vgg\.pth' does not exist; expected a torchvision vgg16 state dict",
    ):
        check_launch(config, world_size=1)


def test_zero3_selective_turns_off_deepspeeds_in_place_linear(tmp_path: Path) -> None:
    """ZeRO-3's memory_efficient_linear corrupts selective checkpoints (see test_trajectory):
    launch turns it off for `selective`, leaves it alone otherwise, refuses an explicit true."""

    def zero(checkpoint: str, **overrides: object) -> dict:
        path = _ds_json(tmp_path, zero_optimization={"stage": 3, **overrides})
        config = load_config(
            None, [f"run.deepspeed_config={path}", f"trajectory.checkpoint={checkpoint}"]
        )
        return check_launch(config, world_size=1)["zero_optimization"]

    assert zero("selective")["memory_efficient_linear"] is False
    assert zero("selective", memory_efficient_linear=False)["memory_efficient_linear"] is False
    assert "memory_efficient_linear" not in zero("step")
    with pytest.raises(ConfigError, match=r"memory_efficient_linear=true, which gives wrong"):
        zero("selective", memory_efficient_linear=True)


def test_cli_reports_a_bad_config_before_building_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from e2ed2.engine.cli.train import main
    from e2ed2.engine.train import trainer as trainer_module

    def no_trainer(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trainer was built despite a bad config")

    monkeypatch.setattr(trainer_module.Trainer, "__init__", no_trainer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    zero3 = _ds_json(tmp_path, train_micro_batch_size_per_gpu=4)
    for argv, key in (
        (["run.max_stepz=3"], "run.max_stepz"),
        ([f"run.deepspeed_config={zero3}", "run.batch_per_rank=8"], "run.batch_per_rank"),
    ):
        started = time.perf_counter()
        assert main(argv) == 2
        elapsed = time.perf_counter() - started
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key in err and err.startswith("e2ed2 train: config error:")
        assert elapsed < 1.0, f"{argv}: {elapsed:.2f}s"


# ------------------------------------------------------------------------- 5. safe loading


def test_engine_torch_loads_are_weights_only() -> None:
    """Every ``torch.load`` call in the engine passes ``weights_only=True``."""
    calls = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                calls.append((f"{path.name}:{node.lineno}", getattr(flag, "value", None)))
    assert len(calls) >= 3, f"the scan found too few torch.load calls: {calls}"
    assert all(value is True for _, value in calls), calls


class _Payload:
    """Pickles to a call of ``Path.touch``: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_deepspeed_checkpoints_load_weights_only(tmp_path: Path, world_of_one: None) -> None:
    import deepspeed

    from e2ed2.engine.config.optim import OptimConfig
    from e2ed2.engine.train.checkpoint import use_weights_only_loading
    from e2ed2.engine.train.distributed import build_ds_config, init_distributed

    init_distributed()

    def engine(stage: str):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        config = build_ds_config(
            stage,
            batch_per_rank=2,
            grad_accum_steps=1,
            world_size=1,
            optim=OptimConfig(),
            precision="fp32",
        )
        built, *_ = deepspeed.initialize(
            model=model, model_parameters=list(model.parameters()), config=config
        )
        return built

    for stage in ("zero2", "zero3"):
        trained = engine(stage)
        trained.backward(trained(torch.ones(2, 4)).square().mean())
        trained.step()
        trained.save_checkpoint(str(tmp_path / stage), tag="t", save_latest=False)
        fresh = engine(stage)
        assert use_weights_only_loading(fresh)
        loaded, _ = fresh.load_checkpoint(str(tmp_path / stage), tag="t")
        assert loaded is not None
        with deepspeed.zero.GatheredParameters(
            list(fresh.module.parameters()) + list(trained.module.parameters())
        ):
            for a, b in zip(fresh.module.parameters(), trained.module.parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)

    # A checkpoint file that runs code when unpickled: refused, the code never runs.
    states = next((tmp_path / "zero2" / "t").glob("mp_rank_00_model_states.pt"))
    marker = tmp_path / "code-ran"
    torch.save({"module": _Payload(marker)}, states)
    guarded = engine("zero2")
    use_weights_only_loading(guarded)
    with pytest.raises(Exception, match="Weights only load failed"):
        guarded.load_checkpoint(str(tmp_path / "zero2"), tag="t")
    assert not marker.exists()
    # DeepSpeed's own loader would have run it (so the check above is not vacuous).
    with pytest.raises(Exception):  # noqa: B017 (it fails after running the payload)
        engine("zero2").load_checkpoint(str(tmp_path / "zero2"), tag="t")
    assert marker.exists()


def test_resuming_with_a_different_config_names_the_mismatch(
    tmp_path: Path, world_of_one: None
) -> None:
    from e2ed2.engine.train.trainer import CheckpointMismatchError

    _trainer(tmp_path, "run.max_steps=1").train()
    assert (tmp_path / "checkpoints" / "step00000001").is_dir()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"different config: model\.num_layers: checkpoint 1, config 2; "
        r"trajectory\.num_steps: checkpoint 2, config 3 \(start a new run\.output_dir",
    ):
        _trainer(tmp_path, "run.max_steps=2", "model.num_layers=2", "trajectory.num_steps=3")


# ------------------------------------------------------------------------ 4. non-finite steps


def _poison(monkeypatch: pytest.MonkeyPatch, faults: str) -> None:
    """The run's fault plan (core/faults.py): e.g. a NaN loss at step 3, a finite loss with a
    NaN gradient at step 4."""
    monkeypatch.setenv(FAULTS_ENV, faults)


@pytest.mark.parametrize(
    ("ds_config", "precision"),
    [("none", "fp32"), ("zero2", "fp32"), ("zero3", "fp32"), ("none", "bf16"), ("zero2", "bf16")],
)
def test_nonfinite_loss_or_gradient_skips_the_step(
    tmp_path: Path,
    world_of_one: None,
    monkeypatch: pytest.MonkeyPatch,
    ds_config: str,
    precision: str,
) -> None:
    """Step 3 has a NaN loss, step 4 a finite loss with NaN gradients: both leave the weights,
    the EMA and the optimizer untouched; steps 2 and 5 train."""
    _poison(monkeypatch, "nan_loss@3,nan_gradient@4")
    trainer = _trainer(
        tmp_path,
        f"run.deepspeed_config={ds_config}",
        f"run.precision={precision}",
        "run.max_steps=5",
    )
    batches = iter(trainer.loader)
    weights = [_local_weights(trainer)]
    ema = [[s.clone() for s in trainer.ema.shadow]]
    for _ in range(5):
        trainer.train_step(batches)
        weights.append(_local_weights(trainer))
        ema.append([s.clone() for s in trainer.ema.shadow])
        for w in weights[-1]:
            assert torch.isfinite(w).all()
    assert not _same(weights[2], weights[1])
    assert _same(weights[3], weights[2]) and _same(weights[4], weights[2])
    assert _same(ema[3], ema[2]) and _same(ema[4], ema[2])
    assert not _same(weights[5], weights[4])
    assert trainer.counters.skipped_steps == 2 and trainer.counters.consecutive_skipped_steps == 0
    if (ds_config, precision) != ("none", "fp32"):  # DeepSpeed's optimizer itself skipped
        assert trainer.engine.skipped_steps == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_discriminator_step_is_skipped(
    tmp_path: Path, world_of_one: None, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """A NaN discriminator loss (2nd discriminator update of step 2) leaves the discriminator's
    weights untouched in fp32 (the trainer skips it) and bf16 (DeepSpeed does); the others
    train and every weight stays finite."""
    import e2ed2.engine.train.trainer as trainer_module

    calls = {"n": 0}
    original = trainer_module.discriminator_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 + 2 else loss  # 2 updates per step

    monkeypatch.setattr(trainer_module, "discriminator_loss", poisoned)
    trainer = _trainer(
        tmp_path,
        "gan.enabled=true",
        "gan.disc_steps_per_gen_step=2",
        f"run.precision={precision}",
        "run.max_steps=3",
    )
    disc = trainer.disc_engine.module
    weights = [[p.detach().clone() for p in disc.parameters()]]
    steps_seen = []
    original_step = trainer.disc_engine.step

    def recording_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        steps_seen.append([p.detach().clone() for p in disc.parameters()])
        return result

    monkeypatch.setattr(trainer.disc_engine, "step", recording_step)
    batches = iter(trainer.loader)
    for _ in range(3):
        trainer.train_step(batches)
    weights += steps_seen
    # weights[i]: after the i-th discriminator update; update 4 had the NaN loss.
    assert len(weights) == 7
    assert not _same(weights[3], weights[2])
    assert _same(weights[4], weights[3])
    assert not _same(weights[5], weights[4])
    assert all(torch.isfinite(w).all() for w in weights[-1])
    if precision == "fp32":
        assert trainer.counters.skipped_disc_steps == 1
    assert trainer.counters.skipped_steps == 0  # the generator trained every step


def test_nonfinite_steps_in_a_row_stop_after_a_checkpoint(
    tmp_path: Path,
    world_of_one: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """Through ``e2ed2 train``: from step 3 on every loss is NaN; after 3 in a row the run
    writes a checkpoint and exits 1 with a message naming the setting and the checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from e2ed2.engine.cli.train import main

    _poison(monkeypatch, "nan_loss@3-")  # every step from 3 on
    argv = [
        "--config",
        "scratch",
        *TINY,
        f"run.output_dir={tmp_path}",
        "run.max_steps=10",
        "run.max_consecutive_nonfinite_steps=3",
        "run.deepspeed_config=none",
    ]
    with caplog.at_level(logging.WARNING, logger="e2ed2.train"):
        assert main(argv) == 1
    assert re.search(
        r"e2ed2 train: stopped: 3 optimizer steps in a row \(up to step 5\).*"
        r"max_consecutive_nonfinite_steps=3\).*step00000005",
        capsys.readouterr().err,
    )
    assert "step 3: NaN/Inf loss, optimizer step skipped (1 in a row, 1 in total)" in caplog.text
    checkpoint = tmp_path / "checkpoints" / "step00000005"
    state = json.loads((checkpoint / "trainer.json").read_text())
    assert state["counters"]["skipped_steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite_steps"] for r in records] == [0, 0, 1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    skipped = events.Scalars("train/skipped_nonfinite_steps")
    assert [(e.step, e.value) for e in skipped][-1] == (5, 3.0)


# ------------------------------------------------------------------------------- 2. bad data

LATENT, TEXT = (4, 8, 8), (7, 12)


def _shard(path: Path, rows: range, *, nan_rows=(), latent_shape=LATENT, dtype=torch.float16):
    g = torch.Generator().manual_seed(rows.start)
    count = len(rows)
    mean = torch.randn(count, *latent_shape, generator=g)
    for row in nan_rows:
        mean[row - rows.start, 0, 0, 0] = float("nan")
    tensors = {
        "latents": mean.to(dtype),
        "encoder_hidden_states": torch.randn(count, *TEXT, generator=g).half(),
        "encoder_attention_mask": torch.ones(count, TEXT[0], dtype=torch.bool),
    }
    files = [f"img{i}.png" for i in rows]
    metadata = {"captions": json.dumps([f"image {i}" for i in rows]), "files": json.dumps(files)}
    save_file(tensors, str(path), metadata=metadata)


def _bad_shard_folder(root: Path) -> Path:
    """Six shards of 4 samples: 0 good but row 1 NaN, 1 wrong shape, 2 wrong dtype, 3 good,
    4 truncated, 5 good. Bad: 1 + 4 + 4 + 4 = 13 of 24 samples."""
    root.mkdir()
    shards = []
    for number in range(6):
        rows = range(4 * number, 4 * number + 4)
        path = root / f"shard-{number:05d}.safetensors"
        if number == 1:
            _shard(path, rows, latent_shape=(4, 8, 6))
        elif number == 2:
            _shard(path, rows, dtype=torch.float64)
        else:
            _shard(path, rows, nan_rows=(1,) if number == 0 else ())
        if number == 4:
            path.write_bytes(path.read_bytes()[:100])
        shards.append({"file": path.name, "num_samples": 4})
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "num_samples": 24,
        "shards": shards,
        "latent": {"kind": "sample", "shape": list(LATENT), "dtype": "float16"},
        "text": {"shape": list(TEXT), "dtype": "float16"},
        "vae": {"scaling_factor": 1.0, "shift_factor": None},
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_bad_shards_and_samples_are_replaced_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _bad_shard_folder(tmp_path / "shards")
    with caplog.at_level(logging.WARNING, logger="e2ed2.engine.data.shards"):
        dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(root)))
    assert sorted(dataset.bad_shards) == [1, 2, 4]
    assert re.search(
        r"bad shard .*shard-00001\.safetensors \(its 4 samples are skipped\): latents has shape \(4, 4, 8, 6\)",
        caplog.text,
    )
    assert re.search(
        r"shard-00002\.safetensors.*latents has dtype F64, expected one of \['F16'\]", caplog.text
    )
    assert "shard-00004.safetensors" in caplog.text

    good = dataset[0]
    assert good["bad_count"] == 0 and good["bad_sample"] == "" and good["index"] == 0
    nan = dataset[1]  # replaced by the next good sample
    assert nan["bad_count"] == 1 and nan["index"] == 2
    assert re.fullmatch(
        r".*shard-00000\.safetensors row 1 \(source img1\.png\): non-finite values \(NaN/Inf\) in latents",
        nan["bad_sample"],
    )
    for index in (4, 10, 17):  # wrong shape, wrong dtype, truncated: next good is 12 / 12 / 20
        item = dataset[index]
        assert item["bad_count"] == 1 and item["index"] == (12 if index < 12 else 20)
        assert torch.isfinite(item["latents"]).all()
    assert "row 1: in a bad shard: unreadable (SafetensorError" in dataset[17]["bad_sample"]

    # Every shard bad: nothing to train on, one error naming the first problem.
    for number in (0, 3, 5):
        (root / f"shard-{number:05d}.safetensors").unlink()
    with pytest.raises(
        ValueError,
        match=r"no usable shard \(first: .*shard-00000\.safetensors: listed in index\.json but missing",
    ):
        LatentShardDataset(DataConfig(source="shards", shard_dir=str(root)))


def test_training_skips_bad_samples_and_stops_past_the_fraction(
    tmp_path: Path, world_of_one: None, caplog: pytest.LogCaptureFixture
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from e2ed2.engine.train.trainer import DataError

    root = _bad_shard_folder(tmp_path / "shards")
    data = ["data.source=shards", f"data.shard_dir={root}", "run.batch_per_rank=4"]
    # 6 steps x 4 = one epoch of 24 samples, 13 of them bad: tolerated below 13/24.
    trainer = _trainer(
        tmp_path / "ok", *data, "run.max_steps=6", "data.max_bad_sample_fraction=0.6"
    )
    with caplog.at_level(logging.WARNING, logger="e2ed2.train"):
        history = trainer.train()
    assert trainer.counters.bad_samples == 13 and trainer.counters.samples_drawn == 24
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in history)
    assert trainer.counters.skipped_steps == 0
    logged = re.findall(r"skipped bad sample (\S+) row (\d+)", caplog.text)
    assert len(logged) == 13 and {Path(f).name for f, _ in logged} == {
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
        "shard-00004.safetensors",
    }
    assert [
        json.loads(line)["bad_samples"]
        for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()
    ][-1] == 13
    events = EventAccumulator(str(tmp_path / "ok" / "tensorboard"))
    events.Reload()
    assert events.Scalars("data/bad_samples")[-1].value == 13

    strict = _trainer(
        tmp_path / "strict", *data, "run.max_steps=6", "data.max_bad_sample_fraction=0.1"
    )
    with pytest.raises(
        DataError,
        match=r"samples drawn were bad \(share 0\.\d+ > data\.max_bad_sample_fraction=0\.1\)",
    ):
        strict.train()
    assert strict.counters.bad_samples / 24 > 0.1 and strict.step < 6


def test_precompute_reports_each_bad_input_by_path_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated image, a missing caption and an encoding with NaN are each skipped, logged
    and listed by path; the good images are written."""
    from diffusers import AutoencoderKL
    from PIL import Image
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from e2ed2.engine.data import precompute as module

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).save_pretrained(tmp_path / "vae")
    tokenizer = ByT5Tokenizer()
    T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "broken", "c", "uncaptioned"):
        Image.new("RGB", (8, 8), (40 * len(name), 80, 120)).save(images / f"{name}.png")
        if name != "uncaptioned":
            (images / f"{name}.txt").write_text(f"picture {name}")
    png = (images / "broken.png").read_bytes()
    (images / "broken.png").write_bytes(png[: len(png) // 2])

    monkeypatch.setenv(FAULTS_ENV, "nan_latent@2")  # the VAE overflows on b.png, the 2nd image
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        index = module.precompute(
            images,
            tmp_path / "shards",
            vae_path=tmp_path / "vae",
            text_encoder_path=tmp_path / "t5",
            resolution=8,
            caption_max_tokens=8,
            batch_size=1,
            progress=False,
        )
    reasons = {entry["path"]: entry["reason"] for entry in index["skipped"]}
    assert sorted(reasons) == ["b.png", "broken.png", "uncaptioned.png"]
    assert reasons["b.png"].startswith("non-finite latent or text embedding (NaN/Inf)")
    assert reasons["broken.png"].startswith("unreadable image")
    assert reasons["uncaptioned.png"].startswith("no caption")
    for name in reasons:
        assert f"skipping {name}:" in caplog.text
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path / "shards")))
    assert dataset.files == ["a.png", "c.png"]
    assert all(dataset[i]["bad_count"] == 0 for i in range(2))


_ONE_RANK_NAN_SCRIPT = """
import json, os, sys
import torch
from e2ed2.engine.config import load_config
from e2ed2.engine.core.faults import FAULTS_ENV
from e2ed2.engine.train.trainer import Trainer

out, tiny, zero3 = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
tiny = json.loads(tiny)
os.environ[FAULTS_ENV] = "nan_loss@2:rank=1"  # NaN loss on rank 1 only, at step 2
for ds_config in ("none", zero3):
    name = "none" if ds_config == "none" else "zero3"
    trainer = Trainer(load_config(None, [*tiny, f"run.output_dir={out}/{name}",
                                         f"run.deepspeed_config={ds_config}", "run.max_steps=3"]))
    batches = iter(trainer.loader)
    snapshots = [[getattr(p, "ds_tensor", p).detach().clone()
                  for p in trainer.engine.module.parameters()]]
    for _ in range(3):
        trainer.train_step(batches)
        snapshots.append([getattr(p, "ds_tensor", p).detach().clone()
                          for p in trainer.engine.module.parameters()])
    moved = [any(not torch.equal(a, b) for a, b in zip(x, y))
             for x, y in zip(snapshots, snapshots[1:])]
    with open(f"{out}/{name}-rank{trainer.rank}.json", "w") as f:
        json.dump({"moved": moved, "skipped": trainer.counters.skipped_steps,
                   "finite": all(bool(torch.isfinite(t).all()) for t in snapshots[-1])}, f)

from e2ed2.engine.train.distributed import exit_process
exit_process(0)
"""


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_all_ranks(
    tmp_path: Path,
    run_checked: Callable[..., str],
    deepspeed_command: Callable[..., list[str]],
    zero3_partition_everything: str,
) -> None:
    """Real launcher, 2 ranks, plain data parallel and ZeRO-3: rank 1 alone sees a NaN loss at
    step 2; both ranks skip that step (and only that one) and stay finite."""
    script = tmp_path / "one_rank_nan.py"
    script.write_text(_ONE_RANK_NAN_SCRIPT)
    run_checked(
        deepspeed_command(
            str(script),
            str(tmp_path),
            json.dumps(TINY),
            zero3_partition_everything,
        )
    )
    for name in ("none", "zero3"):
        for rank in (0, 1):
            result = json.loads((tmp_path / f"{name}-rank{rank}.json").read_text())
            assert result == {"moved": [True, False, True], "skipped": 1, "finite": True}, (
                name,
                rank,
                result,
            )
