"""Each shipped preset states the GPU memory it is for, and its whole step is estimated at small
scale here (tiny models of the same families; the full-size table is
benchmarks/bench_whole_step.py's)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from e2ed2.engine.config import load_config, resolve_preset, shipped_presets
from e2ed2.engine.train.step_estimate import estimate_step

FITS = re.compile(r"^# fits: (\d+) x (\d+(?:\.\d+)?) GB", re.MULTILINE)
# Preset -> the tiny model folder fixture of its family.
SMALL = {
    "pixart_alpha_512": "pixart_512_folder",
    "pixart_alpha_512_lora_24gb": "pixart_512_folder",
    "pixart_alpha_1024": "pixart_1024_ms_folder",
    "sd3_medium_512": "sd3_folder",
}


@pytest.mark.parametrize("name", sorted(shipped_presets()))
def test_every_preset_header_states_its_hardware(name: str) -> None:
    text = Path(resolve_preset(name)).read_text()
    assert FITS.search(text) or "# fits: any" in text, f"{name}: no '# fits: N x G GB' line"


def test_presets_estimate_at_small_scale(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The presets' whole step (their policies, passes, LoRA, teacher) runs under fake tensors
    on tiny models of their families and fits the memory their header states."""
    for name, fixture in SMALL.items():
        folder = request.getfixturevalue(fixture)
        gpus, gb = FITS.search(Path(resolve_preset(name)).read_text()).groups()
        config = load_config(
            name,
            [
                f"model.pretrained_path={folder}",
                f"model.vae_path={folder}",
                f"data.shard_dir={tmp_path / 'no-shards'}",
                "trajectory.num_steps=1",
                "objective.teacher_steps=1",
                "run.batch_per_rank=1",
            ],
        )
        estimate = estimate_step(config, world_size=int(gpus), alone_lines=False)
        assert 0 < estimate.peak_device_bytes < float(gb) * 1e9, (name, estimate.as_dict())
        assert estimate.measured_peak_bytes > 0, name
