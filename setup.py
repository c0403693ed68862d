"""Distribution `e2ed2`: `engine/` installs as `e2ed2.engine`, `kernels/` as `e2ed2.kernels`."""

from setuptools import setup

setup(
    name="e2ed2",
    version="0.1.0",
    description=(
        "Memory-optimized DeepSpeed training engine for end-to-end differentiable diffusion "
        "(backprop through the whole few-step sampler)."
    ),
    python_requires=">=3.10",
    # `e2ed2` itself is an implicit namespace package: the top-level layout has no e2ed2/ folder.
    packages=["e2ed2.engine", "e2ed2.kernels"],
    package_dir={"e2ed2.engine": "engine", "e2ed2.kernels": "kernels"},
    install_requires=[
        # A plain `torch` requirement lets pip pick the registry's default build (CUDA), whose
        # torchvision ops load; the lpips package needs torchvision.
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.15",
        "diffusers>=0.30",
        "transformers>=4.40",
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
    ],
    entry_points={"console_scripts": ["e2ed2 = e2ed2.engine.cli:main"]},
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.17,<0.18"],
        "xformers": ["xformers"],
    },
)
