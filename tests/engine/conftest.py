"""Shared by the tests that start the real ``deepspeed`` launcher on CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from e2ed2.engine.train.distributed import free_port

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
# Set by the launcher for each rank; a value left over in this process must not leak into it.
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def launcher_env() -> dict[str, str]:
    """Environment for launcher subprocesses: CPU only, one BLAS thread per rank (2 cores)."""
    env = {key: value for key, value in os.environ.items() if key not in _RENDEZVOUS}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture
def run_checked(launcher_env: dict[str, str]) -> Callable[..., str]:
    """Runs a command in ``launcher_env``; fails the test with its output tail unless it exits 0.
    Returns stdout + stderr."""

    def run(cmd: list[str], timeout: int = 600) -> str:
        done = subprocess.run(
            cmd, env=launcher_env, capture_output=True, text=True, timeout=timeout
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, (
            f"{' '.join(cmd)} failed ({done.returncode}):\n{output[-4000:]}"
        )
        return output

    return run


@pytest.fixture
def deepspeed_command() -> Callable[..., list[str]]:
    """``deepspeed_command(*args, ranks=2)``: the real launcher's command line on a free port
    (``args``: ``--module e2ed2.engine.cli.train ...`` or a script and its arguments)."""

    def command(*args: str, ranks: int = 2) -> list[str]:
        launcher = str(Path(sys.executable).parent / "deepspeed")
        return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]

    return command


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's variables for one rank, removed again after the test (subprocesses that
    later tests start must not inherit them)."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    # An in-process ZeRO-3 engine replaces torch.nn.functional.linear for the whole process
    # (DeepSpeed's memory_efficient_linear); later tests must get torch's own back.
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)


@pytest.fixture
def zero3_partition_everything(tmp_path: Path) -> str:
    """The shipped ZeRO-3 config with no persistent parameters, as a JSON path.

    ZeRO-3 keeps parameters under ``stage3_param_persistence_threshold`` elements whole on every
    rank; with the shipped 1e5 nearly all of a tiny model would be, and the tests would not
    exercise gathering and partitioning at all.
    """
    config = json.loads((DS_CONFIGS / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partition_everything.json"
    path.write_text(json.dumps(config))
    return str(path)


# -- real-structure model folders (tests/engine/real_models.py) ---------------------------------
def _real_models():
    # tests/ is no package (pytest --import-mode=importlib): load the helper module by path.
    import importlib.util
    import sys

    name = "e2ed2_tests_real_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("real_models.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


#: A tiny single-process training run: a 1-block PixArt on 8 px digits, batch 2, no DeepSpeed
#: JSON, no samples or export, every step logged. Tests add the keys they are about.
TINY_RUN = (
    "model.num_layers=1",
    "model.num_attention_heads=2",
    "model.attention_head_dim=8",
    "data.resolution=8",
    "data.text_dim=16",
    "data.caption_max_tokens=8",
    "run.batch_per_rank=2",
    "run.log_every_steps=1",
    "run.checkpoint_every_steps=1000",
    "run.num_sample_images=0",
    "run.export_at_end=false",
    "run.deepspeed_config=none",
    "run.cpu_threads=1",
)


@pytest.fixture
def tiny_run(tmp_path: Path) -> list[str]:
    """:data:`TINY_RUN`'s overrides with ``run.output_dir`` in the test's tmp_path."""
    return [*TINY_RUN, f"run.output_dir={tmp_path / 'run'}"]


@pytest.fixture(scope="session")
def real_models():
    """The builders of tests/engine/real_models.py (tiny models with real checkpoints' structure)."""
    return _real_models()


@pytest.fixture(scope="session")
def pixart_1024_ms_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PixArt-LCM-XL-2-1024-MS-structured pipeline folder (sample_size 128: size conditions)."""
    return _real_models().save_pixart_pipeline(tmp_path_factory.mktemp("PixArt-LCM-1024-MS"), 128)


@pytest.fixture(scope="session")
def pixart_512_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512 px PixArt-α-structured pipeline folder (sample_size 64: no size conditions)."""
    return _real_models().save_pixart_pipeline(tmp_path_factory.mktemp("PixArt-LCM-512"), 64)


@pytest.fixture(scope="session")
def pixart_sigma_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PixArt-Sigma-XL-2-1024-MS-structured pipeline folder (PixArtSigmaPipeline)."""
    folder = tmp_path_factory.mktemp("PixArt-Sigma-1024-MS")
    return _real_models().save_pixart_pipeline(folder, 128, sigma=True)


@pytest.fixture(scope="session")
def mixed_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned images of mixed sizes and aspect ratios."""
    return _real_models().save_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def bucket_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned images, two each of 3:1, 1:1 and 3:4 (three PixArt buckets at 64 px)."""
    return _real_models().save_bucket_image_folder(tmp_path_factory.mktemp("bucket-images"))


def _precompute(folder: Path, images: Path, out: Path, buckets: str = "none") -> Path:
    from e2ed2.engine.data.precompute import precompute

    # 64 px: the presets' 512/1024 would only cost time; the tiny VAE downsamples 8x to 8x8.
    precompute(
        images,
        out,
        vae_path=folder,
        text_encoder_path=folder,
        resolution=64,
        buckets=buckets,
        caption_max_tokens=16,
        batch_size=4,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def shards_1024(pixart_1024_ms_folder, mixed_image_folder, tmp_path_factory) -> Path:
    """``mixed_image_folder`` precomputed with the 1024-MS folder's VAE and T5 (64 px)."""
    out = tmp_path_factory.mktemp("shards-1024")
    return _precompute(pixart_1024_ms_folder, mixed_image_folder, out)


@pytest.fixture(scope="session")
def shards_sigma(pixart_sigma_folder, mixed_image_folder, tmp_path_factory) -> Path:
    """``mixed_image_folder`` precomputed with the PixArt-Σ folder's SDXL-scaled VAE and T5."""
    out = tmp_path_factory.mktemp("shards-sigma")
    return _precompute(pixart_sigma_folder, mixed_image_folder, out)


@pytest.fixture(scope="session")
def shards_512(pixart_512_folder, mixed_image_folder, tmp_path_factory) -> Path:
    """``mixed_image_folder`` precomputed with the 512 folder's VAE and T5 (64 px)."""
    out = tmp_path_factory.mktemp("shards-512")
    return _precompute(pixart_512_folder, mixed_image_folder, out)


@pytest.fixture(scope="session")
def bucket_shards_1024(pixart_1024_ms_folder, bucket_image_folder, tmp_path_factory) -> Path:
    """``bucket_image_folder`` precomputed with PixArt buckets around 64 px (1024-MS folder)."""
    out = tmp_path_factory.mktemp("bucket-shards-1024")
    return _precompute(pixart_1024_ms_folder, bucket_image_folder, out, buckets="pixart")


@pytest.fixture(scope="session")
def bucket_shards_512(pixart_512_folder, bucket_image_folder, tmp_path_factory) -> Path:
    """``bucket_image_folder`` precomputed with PixArt buckets around 64 px (512 folder)."""
    out = tmp_path_factory.mktemp("bucket-shards-512")
    return _precompute(pixart_512_folder, bucket_image_folder, out, buckets="pixart")


@pytest.fixture(scope="session")
def vgg16_features_path(tmp_path_factory) -> Path:
    """A torchvision vgg16 state dict with its ``features.*`` only (random; what LPIPS loads),
    in fp16 (29 MB instead of the 528 MB of the full fp32 model)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16().features.state_dict()
    path = tmp_path_factory.mktemp("torchvision") / "vgg16-features.pth"
    torch.save({f"features.{k}": v.half() for k, v in features.items()}, path)
    return path


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stable-diffusion-3-medium-diffusers-structured pipeline folder (flow matching MMDiT,
    CLIP-L + CLIP-G + T5, 16-channel VAE with a shift factor)."""
    return _real_models().save_sd3_pipeline(tmp_path_factory.mktemp("SD3-medium"))


@pytest.fixture(scope="session")
def shards_sd3(sd3_folder, mixed_image_folder, tmp_path_factory) -> Path:
    """``mixed_image_folder`` precomputed with the SD3 folder's VAE and text encoders (64 px,
    16 T5 tokens after CLIP's 77)."""
    return _precompute(sd3_folder, mixed_image_folder, tmp_path_factory.mktemp("shards-sd3"))


@pytest.fixture(scope="session")
def sana_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Sana_1600M_1024px_diffusers-structured SanaPipeline folder (linear-attention
    transformer, DC-AE, Gemma-2 + its tokenizer, flow Euler scheduler at shift 3)."""
    return _real_models().save_sana_pipeline(tmp_path_factory.mktemp("Sana"))


@pytest.fixture(scope="session")
def sana_sprint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SANA-Sprint-structured SanaSprintPipeline folder (guidance-embedded transformer,
    SCMScheduler; DC-AE and Gemma-2 as Sana's)."""
    return _real_models().save_sana_pipeline(tmp_path_factory.mktemp("Sana-Sprint"), sprint=True)


@pytest.fixture(scope="session")
def shards_sana(sana_folder, mixed_image_folder, tmp_path_factory) -> Path:
    """``mixed_image_folder`` precomputed with the Sana folder's DC-AE and Gemma-2 (128 px: 4 x 4
    latents through the 32x DC-AE; 16 text tokens)."""
    from e2ed2.engine.data.precompute import precompute

    out = tmp_path_factory.mktemp("shards-sana")
    precompute(
        mixed_image_folder,
        out,
        vae_path=sana_folder,
        text_encoder_path=sana_folder,
        resolution=128,
        caption_max_tokens=16,
        batch_size=4,
        progress=False,
    )
    return out
