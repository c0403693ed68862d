"""Distribution `e2ed2`: `engine/` installs as `e2ed2.engine`, `kernels/` as `e2ed2.kernels`, and
the presets (`configs/`) and DeepSpeed JSONs (`ds_configs/`) as package data `e2ed2.configs` /
`e2ed2.ds_configs`, read through importlib.resources."""

from setuptools import find_packages, setup

# The top level has no e2ed2/ folder: each top-level folder maps onto a subpackage of the
# implicit namespace package `e2ed2`, with its own subpackages found below it.
_FOLDERS = {"engine": "e2ed2.engine", "kernels": "e2ed2.kernels"}
_DATA = {"configs": "e2ed2.configs", "ds_configs": "e2ed2.ds_configs"}
_PACKAGES = [
    f"{name}.{sub}" if sub else name
    for folder, name in _FOLDERS.items()
    for sub in ["", *find_packages(folder)]
] + list(_DATA.values())

setup(
    name="e2ed2",
    version="0.1.0",
    description=(
        "Memory-optimized DeepSpeed training engine for end-to-end differentiable diffusion "
        "(backprop through the whole few-step sampler)."
    ),
    python_requires=">=3.11",  # tomllib (config/loader.py)
    packages=_PACKAGES,
    package_dir={name: folder for folder, name in {**_FOLDERS, **_DATA}.items()},
    # digits_base/: the embedded preset's pretrained digits denoiser (1.3 MB, configs/digits_base/README.md).
    package_data={
        "e2ed2.configs": ["*.toml", "digits_base/*.json", "digits_base/*.safetensors"],
        "e2ed2.ds_configs": ["*.json"],
    },
    install_requires=[
        # A plain `torch` requirement lets pip pick the registry's default build (CUDA), whose
        # torchvision ops load; the lpips package needs torchvision.
        # Upper bounds: the next major (minor for 0.x) release is untested and may change the
        # behaviour the engine relies on (tests/test_versions.py fails on such an install).
        "torch>=2.4,<3",
        "torchvision",
        # >= 0.19 / 0.42: the ZeRO-3 micro-step and persistence behaviour the per-step backward
        # and gather-once rely on, and the diffusers pipelines the exports write.
        "deepspeed>=0.19,<0.20",
        "diffusers>=0.42,<0.43",
        # LoRA adapters (model.lora_rank): injection, state dicts and merging (core/lora.py).
        "peft>=0.21",
        "transformers>=4.40,<6",
        # PixArt's T5 tokenizer folders hold a bare sentencepiece model (spiece.model, no
        # tokenizer.json): transformers converts it with sentencepiece + protobuf.
        "sentencepiece",
        "protobuf",
        "lpips>=0.1.4",
        "triton; platform_system == 'Linux'",
        "tensorboard",
        "safetensors",
        "numpy",
        "tqdm",
        # Embedded default dataset (8x8 digits) and plots for the benchmarks.
        "scikit-learn",
        "matplotlib",
        # FID / CLIP score for `e2ed2 evaluate` on real data (latent-shard exports).
        "torchmetrics>=1.4",
        "torch-fidelity>=0.3",
        # `e2ed2 precompute` inputs users already keep: Hugging Face datasets (load_from_disk
        # folders, parquet/arrow files) and webdataset .tar shards read as a stream.
        "datasets>=3.0",
        "webdataset>=0.2",
    ],
    entry_points={"console_scripts": ["e2ed2 = e2ed2.engine.cli.main:main"]},
    extras_require={
        # wandb is in dev so the tracker tests (offline mode) run in CI.
        # mypy: .ci/run type-checks engine/ and kernels/ (config in pyproject.toml; tested 2.4).
        "dev": ["pytest>=8", "ruff>=0.17,<0.18", "mypy>=2.4,<2.5", "wandb>=0.17"],
        "wandb": ["wandb>=0.17"],
        "xformers": ["xformers"],
    },
)
