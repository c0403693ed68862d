"""The offline digit metric: a classifier that reads held-out digits, a Fréchet distance that
separates real digits from non-digits, and the ``e2ed2 evaluate`` command's error paths; FID /
CLIP score on latent-shard exports with randomly initialised local InceptionV3 and CLIP weights
(made here, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import linalg

from e2ed2.engine.cli.evaluate import main
from e2ed2.engine.cli.main import main as cli_main
from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data.shards import INDEX_FORMAT, INDEX_VERSION
from e2ed2.engine.eval.common import frechet_distance
from e2ed2.engine.eval.digits import DigitEvaluator
from e2ed2.engine.eval.real_data import RealDataScorer, real_data_metrics, to_uint8


@pytest.fixture(scope="module")
def evaluator() -> DigitEvaluator:
    # One classifier for the module (training it is the slow part, ~10-30 s on 2 cores).
    return DigitEvaluator(DataConfig())


def test_frechet_distance_matches_the_matrix_square_root_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ np.diag([1, 2, 3, 0.5, 1, 4]) + 0.7
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # A singular covariance (fewer distinct rows than dimensions) still gives a finite value.
    assert np.isfinite(frechet_distance(np.repeat(a[:3], 10, axis=0), b))


def test_classifier_reads_held_out_digits(evaluator: DigitEvaluator) -> None:
    scores = evaluator.score(evaluator.holdout.images, evaluator.holdout.labels)
    assert scores.accuracy > 0.95
    shuffled = evaluator.holdout.labels[torch.randperm(len(evaluator.holdout.labels))]
    assert evaluator.score(evaluator.holdout.images, shuffled).accuracy < 0.3


def test_fd_separates_real_digits_from_noise_and_blur(evaluator: DigitEvaluator) -> None:
    floor = evaluator.noise_floor(num_draws=3)
    real_fd = floor["train_real"]["fd_mean"]
    assert floor["train_real"]["accuracy_mean"] > 0.95
    # The per-class mean image is what an L2-regressed sampler tends to: perfectly conditioned,
    # no diversity. The metric must rank it far behind real digits, and noise behind both.
    assert floor["class_means"]["fd"] > 5 * real_fd
    assert floor["gaussian_noise"]["fd"] > 3 * floor["class_means"]["fd"]
    assert floor["gaussian_noise"]["accuracy"] < 0.3


def test_evaluate_cli_names_a_missing_export(tmp_path, capsys) -> None:
    assert cli_main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "e2ed2_config.toml" in capsys.readouterr().err


def test_real_data_metrics_names_missing_weights(tmp_path) -> None:
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    missing = tmp_path / "inception.pth"
    with pytest.raises(FileNotFoundError, match="inception.pth"):
        real_data_metrics(images, images, inception_weights=missing)
    missing.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="clip"):
        real_data_metrics(images, images, inception_weights=missing, clip_model=tmp_path / "clip")


# ------------------------------------------------------------------ real data (latent shards)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's InceptionV3 (FID variant) with random weights, saved like the real file.

    The default random init makes the 2048 features nearly constant (every FID ~1e-12), so the
    convolutions are re-drawn with He scaling: different images then get different features.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    with (
        mock.patch.object(fx, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        model = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 4:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table (byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model + processor (byte-level vocabulary, no merges), saved locally."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder = tmp_path_factory.mktemp("clip")
    chars = list(_bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": 2,
            "vocab_size": len(vocab),
            "max_position_embeddings": 32,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={**tower, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_to_uint8_maps_the_pixel_range_and_repeats_gray() -> None:
    pixels = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = to_uint8(pixels)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, 2].flatten().tolist() == [0, 128, 255, 255]


def test_fid_with_local_weights_reuses_the_reference(inception_weights: Path) -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    flat = (torch.rand(6, 3, 1, 1, generator=g) * 255).to(torch.uint8).expand(6, 3, 16, 16)
    assert abs(real_data_metrics(real, real, inception_weights=inception_weights)["fid"]) < 1e-3
    scorer = RealDataScorer(inception_weights=inception_weights)
    scorer.add_reference(real[:4])
    scorer.add_reference(real[4:])  # reference in batches, fed once
    scorer.add_generated(flat.contiguous())
    different = scorer.compute()["fid"]
    assert different > 1.0
    for batch in (real[:3], real[3:]):  # the reference is kept, the generated set forgotten
        scorer.add_generated(batch)
    assert abs(scorer.compute()["fid"]) < 1e-3 < different * 1e-3
    assert scorer.num_reference == 6


def test_clip_score_from_a_local_folder(inception_weights: Path, clip_folder: Path) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    captions = ["a red square", "noise", "a long caption " * 10]  # truncated to 32 tokens
    with pytest.warns(UserWarning, match="longer than"):
        scores = real_data_metrics(
            images,
            images,
            inception_weights=inception_weights,
            captions=captions,
            clip_model=clip_folder,
        )
    assert set(scores) == {"fid", "clip_score"}
    assert np.isfinite(scores["clip_score"]) and 0 <= scores["clip_score"] <= 100
    with pytest.raises(ValueError, match="one caption per generated image"):
        real_data_metrics(
            images,
            images,
            inception_weights=inception_weights,
            captions=captions[:2],
            clip_model=clip_folder,
        )


LATENT, TEXT = (4, 4, 4), (7, 12)


def _tiny_shard_export(root: Path, num_samples: int = 3) -> tuple[Path, Path]:
    """A shard folder (stored latents of a tiny x2 VAE) and an untrained export on it."""
    from diffusers import AutoencoderKL

    from e2ed2.engine.config.loader import load_config
    from e2ed2.engine.core.models import build_denoiser
    from e2ed2.engine.train.export import write_export

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT[0],
        norm_num_groups=4,
        sample_size=8,
    ).save_pretrained(root / "vae")
    shards = root / "shards"
    shards.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "latents": torch.randn(num_samples, *LATENT, generator=g).half(),
            "encoder_hidden_states": torch.randn(num_samples, *TEXT, generator=g).half(),
            "encoder_attention_mask": torch.ones(num_samples, TEXT[0], dtype=torch.bool),
        },
        str(shards / "shard-00000.safetensors"),
        metadata={"captions": json.dumps([f"image {i}" for i in range(num_samples)])},
    )
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "num_samples": num_samples,
        "shards": [{"file": "shard-00000.safetensors", "num_samples": num_samples}],
        "latent": {"kind": "sample", "shape": list(LATENT), "dtype": "float16"},
        "text": {"shape": list(TEXT), "dtype": "float16"},
        "vae": {"scaling_factor": 0.18215, "shift_factor": None},
    }
    (shards / "index.json").write_text(json.dumps(index))
    config = load_config(
        None,
        [
            "data.source=shards",
            f"data.shard_dir={shards}",
            f"model.vae_path={root / 'vae'}",
            "model.num_layers=1",
            "model.num_attention_heads=2",
            "model.attention_head_dim=8",
            "trajectory.num_steps=2",
        ],
    )
    model = build_denoiser(
        config.model, latent_channels=LATENT[0], latent_size=LATENT[1], text_dim=TEXT[1]
    )
    export = write_export(root / "export", config, model, model.state_dict())
    return export, shards


def test_evaluate_cli_scores_a_shard_export(
    tmp_path: Path, inception_weights: Path, clip_folder: Path
) -> None:
    export, shards = _tiny_shard_export(tmp_path)
    out = tmp_path / "scores.json"
    argv = [str(export), "--inception-weights", str(inception_weights), "--out", str(out)]
    argv += ["--clip-model", str(clip_folder), "--num-steps", "1", "2", "--seeds", "0", "1"]
    # 5 asked, 3 in the dataset; batches of 2 + 1.
    assert main([*argv, "--num-images", "5", "--batch-size", "2", "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert results["num_images"] == 3 and results["shard_dir"] == str(shards)
    assert "reconstructions" in results["reference"]
    assert set(results["num_steps"]) == {"1", "2"}
    fids = []
    for k in ("1", "2"):
        by_seed = results["num_steps"][k]
        assert [s["seed"] for s in by_seed["per_seed"]] == [0, 1]
        for score in by_seed["per_seed"]:
            assert set(score) == {"seed", "fid", "clip_score"}
            assert np.isfinite(score["clip_score"])
            fids.append(score["fid"])
        assert by_seed["num_seeds"] == 2
        assert by_seed["fid_mean"] == pytest.approx(
            np.mean([s["fid"] for s in by_seed["per_seed"]])
        )
    # Generated vs reconstructions: apart (identical sets score ~1e-7), and each K / seed scores
    # its own images.
    assert min(fids) > 1e-2 and len(set(fids)) == 4


def test_evaluate_cli_shard_errors_name_the_option(
    tmp_path: Path, inception_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export, _ = _tiny_shard_export(tmp_path)
    weights = ["--inception-weights", str(inception_weights)]

    def error(*argv: str) -> str:
        assert main([str(export), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "--inception-weights PATH is required" in error()
    assert "--inception-weights" in error("--inception-weights", str(tmp_path / "none.pth"))
    assert "none.pth" in error("--inception-weights", str(tmp_path / "none.pth"))
    (tmp_path / "clip").mkdir()
    assert "--clip-model" in error(*weights, "--clip-model", str(tmp_path / "clip"))
    message = error(*weights, "--shard-dir", str(tmp_path / "clip"))
    assert "--shard-dir" in message and "index.json" in message
