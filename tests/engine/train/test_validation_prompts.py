"""run.validation_prompts on a PixArt-MS-structured run: the prompts (a .jsonl file) are encoded
by the T5 the shards' index.json records, sampled with fixed seeds at K = 1 and 2 with the
size conditions, written as captioned grids and logged to TensorBoard; the prompt files and
their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from e2ed2.engine.config import ConfigError, load_config
from e2ed2.engine.data.prompt_file import read_prompts


def test_prompt_files_and_their_errors(tmp_path: Path) -> None:
    txt = tmp_path / "prompts.txt"
    txt.write_text("a cat\n\n  a red sofa  \n")
    assert read_prompts(txt) == ["a cat", "a red sofa"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n"a bird"\n')
    assert read_prompts(jsonl) == ["a cat", "a dog", "a bird"]
    jsonl.write_text('{"prompt": "a cat"}\n{"file_name": "x.png"}\n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl line 2: expected a string or an object"):
        read_prompts(jsonl)
    with pytest.raises(ConfigError, match=r"run\.validation_prompts='p\.csv': a prompt file must"):
        load_config(None, ["run.validation_prompts=p.csv"])
    with pytest.raises(ConfigError, match=r"run\.validation_num_steps=\[1, 4\] needs model\.share"):
        load_config(None, ["model.share_across_steps=false", "run.validation_num_steps=[1, 4]"])


def test_pixart_ms_validation_grids_in_tensorboard(
    pixart_1024_ms_folder: Path, shards_1024: Path, tmp_path: Path, world_of_one: None
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from e2ed2.engine.train.trainer import Trainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["a cat on a sofa", "a red bird", "a boat"])
    )
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            f"model.pretrained_path={pixart_1024_ms_folder}",
            f"model.vae_path={pixart_1024_ms_folder}",
            "data.source=shards",
            f"data.shard_dir={shards_1024}",
            "sampler.prediction_type=epsilon",
            "trajectory.num_steps=2",
            "run.max_steps=1",
            "run.batch_per_rank=2",
            "run.num_sample_images=0",
            "run.export_at_end=false",
            "run.deepspeed_config=none",
            "run.cpu_threads=1",
            f"run.output_dir={out}",
            f"run.validation_prompts={prompts}",
            "run.validation_num_steps=[1, 2]",
        ],
    )
    trainer = Trainer(config)
    cond = trainer.validation.cond
    # 1024-MS: the size conditions of the grid's 64 x 64 crop ride with every prompt.
    assert torch.equal(cond.added_cond_kwargs["resolution"], torch.tensor([[64.0, 64.0]] * 3))
    # The same states as the shards' captions are encoded with (their T5, their length).
    assert cond.encoder_hidden_states.shape[1:] == trainer.loader.dataset.text_shape

    def sample() -> dict[int, torch.Tensor]:
        return trainer.validation.sample(
            trainer._networks(),
            trainer.autoencoder.decode,
            trainer.null_cond,
            device=trainer.device,
            dtype=trainer.compute_dtype,
        )

    first = sample()
    assert {k: p.shape for k, p in first.items()} == {1: (3, 3, 64, 64), 2: (3, 3, 64, 64)}
    # Fixed seeds: the same weights give the same images at every call.
    assert all(torch.equal(first[k], sample()[k]) for k in (1, 2))
    assert not torch.equal(first[1], first[2])
    trainer.train()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for k in (1, 2):
        (image,) = events.Images(f"validation/K{k}")
        path = out / "samples" / f"validation-K{k}-step00000001.png"
        # Three 64 px images upscaled x3 to 192 px, side by side, each over its caption band.
        assert Image.open(path).size == (4 + 3 * 196, 4 + 192 + 60 + 4)
        assert (image.width, image.height) == Image.open(path).size
