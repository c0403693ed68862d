"""run.report_to: TensorBoard and wandb (offline) behind one tracker interface, read back from
their own files; the launch-time error for a missing wandb package."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from e2ed2.engine.config import ConfigError, load_config

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
    "run.export_at_end=false",
    "run.deepspeed_config=none",
    "run.cpu_threads=1",
]

# Two 8 px digits upscaled x24 to 192 px cells side by side, 4 px padding, a 60 px caption band
# (3 lines of 14 px text + 4 px spacing, 6 px margin) under each: (4 + 192 + 60 + 4, 4 + 2 * 196).
VALIDATION_GRID_HW = (260, 396)


def read_wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file, as wandb's own protobuf ``Record``s.

    wandb 0.31 ships no Python reader of its transaction log (its Go core writes it), so this
    unpacks the container: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB's
    log format (32 KiB blocks of chunks: crc32c u32, length u16, type u8: 1 full, 2 first,
    3 middle, 4 last; a block tail under 7 bytes is padding)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list) -> dict[int, dict]:
    """step -> {key: value} of the run's history records."""
    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        history.setdefault(int(row.get("_step", record.history.step.num)), {}).update(row)
    return history


def test_tensorboard_and_wandb_offline_get_scalars_images_and_config(
    tmp_path: Path, world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from e2ed2.engine.train.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            *TINY,
            f"run.output_dir={out}",
            "run.max_steps=2",
            "run.sample_every_steps=2",
            "run.num_sample_images=3",
            'run.report_to=["tensorboard", "wandb"]',
            "run.wandb_project=e2ed2-test",
            'run.validation_prompts=["a handwritten seven", "zero"]',
            "run.validation_num_steps=[1, 2]",
        ],
    )
    trainer = Trainer(config)
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    assert [e.step for e in events.Images("samples")] == [2]
    for k in (1, 2):
        (image,) = events.Images(f"validation/K{k}")
        assert image.step == 2 and (image.height, image.width) == VALIDATION_GRID_HW
        assert (out / "samples" / f"validation-K{k}-step00000002.png").is_file()

    run_dirs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert run_dirs[0].name.endswith(run_id)
    records = read_wandb_records(run_dirs[0] / f"run-{run_id}.wandb")
    logged = wandb_history(records)
    assert sorted(logged) == [1, 2], [r.WhichOneof("record_type") for r in records]
    for record in history:
        assert logged[record["step"]]["loss/total"] == pytest.approx(record["total"])
        assert logged[record["step"]]["train/lr"] == pytest.approx(record["lr"])
    # wandb stores a list of images as one "images/separated" value; the PNGs are in files/.
    assert logged[2]["samples/_type"] == "images/separated"
    assert logged[2]["samples/count"] == 1
    media = run_dirs[0] / "files" / "media" / "images"
    assert len(list(media.glob("samples_2_*.png"))) == 1
    for k in (1, 2):
        assert logged[2][f"validation/K{k}/_type"] == "images/separated"
        (png,) = media.glob(f"validation/K{k}_2_*.png")
        assert Image.open(png).size == VALIDATION_GRID_HW[::-1]
    # The resolved config is the wandb run's config (one nested value per section).
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config_items = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.project == "e2ed2-test" and run.run_id == run_id
    assert config_items["run"]["max_steps"] == 2
    assert config_items["trajectory"]["num_steps"] == 2
    assert config_items["run"]["report_to"] == ["tensorboard", "wandb"]


def test_report_to_is_validated_and_a_missing_wandb_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from e2ed2.engine.train.launch import check_launch

    with pytest.raises(ConfigError, match=r"run\.report_to: 'neptune' is not one of"):
        load_config(None, ['run.report_to=["tensorboard", "neptune"]'])
    config = load_config(None, [f"run.output_dir={tmp_path}", 'run.report_to=["wandb"]'])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError) as caught:
        check_launch(config, world_size=1)
    message = str(caught.value)
    assert "\n" not in message
    assert "run.report_to contains 'wandb'" in message and "pip install wandb" in message
