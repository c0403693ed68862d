"""The terms on decoded pixels: device peak per recipe, resolution and batch (issue 26, items 2-3).

Question: what does the paper's pixel term (LPIPS on the VAE-decoded final sample, eq. 7) cost
in device memory at 512² / 1024² / 2048² and batch 1 / 8 per GPU, and how much does each
memory option take off: the decoder checkpointed per block, the pixel terms in passes of rows
(``objective.pixel_rows_per_pass``), LPIPS on a resized image (``objective.lpips_resolution``),
a random crop (``objective.pixel_crop``), a small loss decoder (``objective.loss_decoder_path``,
an AutoencoderTiny)?

Per cell: the final latent (B, 4, H/8, W/8) with gradients, then E2ED2Loss's pixel terms
(decode with gradients + VGG16 LPIPS against the decoded target; target decode without a
graph) and their backward to that latent. Covered: every tensor allocated in that region
(activations, recomputes, gradients, decoded pixels); not covered: the weights (VAE, LPIPS:
about 0.2 GiB in bf16) and the unroll. Full size under ``FakeTensorMode`` (nothing is
allocated, nothing computed), bf16, an SD-structured VAE (block_out_channels 128/256/512/512,
2 layers per block: PixArt's and SD's), LiveTensorTracker's peak. Recipes, cumulative from
"passes of 1 row" on:

    whole, no checkpoint      decode and LPIPS in the graph (AlignProp / DRaFT without
                              gradient checkpointing)
    whole-decoder checkpoint  decode_checkpoint, decode_checkpoint_blocks=false (before issue 26)
    per-block checkpoint      diffusers' per-block decoder checkpoints (the default now)
    passes of 1 row           + objective.pixel_rows_per_pass = 1
    + lpips_resolution 256    + objective.lpips_resolution = 256
    + pixel_crop 512          + objective.pixel_crop = 512 (the whole image at 512²)
    + tiny decoder            + an AutoencoderTiny (TAESD's default config) as loss decoder

``--real``: a real CPU run, fp32, of the same real-width VAE at 64 px with VGG16 LPIPS, passes of
one row, batch 1 and batch 8 (the pixel terms' peak, LiveTensorTracker; the "flat in the batch"
check of issue 26). Only ratios matter there (CPU).

    python benchmarks/bench_pixel_terms.py            # results/pixel_terms.{json,png} (~20 min)
    python benchmarks/bench_pixel_terms.py --real     # the real CPU batch 1 vs 8 run only
    python benchmarks/bench_pixel_terms.py --smoke    # narrow VAE, 512², batch 1 / 2, 2 recipes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from e2ed2.engine import LiveTensorTracker  # noqa: E402
from e2ed2.engine.config.objective import ObjectiveConfig  # noqa: E402
from e2ed2.engine.core.models import FrozenVAE  # noqa: E402
from e2ed2.engine.objectives.losses import E2ED2Loss  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
# Narrower, one layer per block: the decoder still outweighs LPIPS at 512², as at full width.
SMOKE_VAE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32)
RESOLUTIONS = (512, 1024, 2048)
BATCHES = (1, 8)
SMOKE_BATCHES = (1, 2)
SMOKE_RECIPES = ("per-block checkpoint", "passes of 1 row")
BASE = ObjectiveConfig(l2_weight=0.0, lpips_weight=1.0, lpips_random_backbone=True)
RECIPES: dict[str, dict[str, Any]] = {
    "whole, no checkpoint": dict(decode_checkpoint=False, lpips_checkpoint=False),
    "whole-decoder checkpoint": dict(decode_checkpoint_blocks=False),
    "per-block checkpoint": {},
    "passes of 1 row": dict(pixel_rows_per_pass=1),
    "+ lpips_resolution 256": dict(pixel_rows_per_pass=1, lpips_resolution=256),
    "+ pixel_crop 512": dict(pixel_rows_per_pass=1, lpips_resolution=256, pixel_crop=512),
    "+ tiny decoder": dict(pixel_rows_per_pass=1, lpips_resolution=256, pixel_crop=512),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build in ``dtype`` directly: ``Module.to`` cannot swap fake parameters."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_vae(fields: dict[str, Any], dtype: torch.dtype) -> FrozenVAE:
    from diffusers import AutoencoderKL

    with default_dtype(dtype):
        return FrozenVAE(
            AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                scaling_factor=0.18215,
                **fields,
            )
        )


def build_tiny(dtype: torch.dtype) -> FrozenVAE:
    from diffusers import AutoencoderTiny

    with default_dtype(dtype):
        return FrozenVAE(AutoencoderTiny())


def pixel_peak(loss_fn: E2ED2Loss, batch: int, side_px: int, dtype, fake: bool) -> int:
    """Peak bytes of the pixel terms' forward + backward to the final latent (see above)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    cells = side_px // 8
    crops = loss_fn.draw_crops(batch, (cells, cells), seed=0)
    with mode, LiveTensorTracker(track_cuda=False) as tracker:
        g = None if fake else torch.Generator().manual_seed(0)
        sample = torch.randn(batch, 4, cells, cells, dtype=dtype, generator=g).requires_grad_()
        target = torch.randn(batch, 4, cells, cells, dtype=dtype, generator=g)
        passed = loss_fn.terms_in_passes(sample, target, crops=crops)
        passed.loss.backward()
    return tracker.report().peak_bytes


def make_loss(recipe: str, vae: FrozenVAE, tiny: FrozenVAE, lpips_state) -> E2ED2Loss:
    """The recipe's loss (it sets the shared VAE's checkpointing: build it, then run it)."""
    config = dataclasses.replace(BASE, **RECIPES[recipe])
    if recipe == "+ tiny decoder":
        # What objective.loss_decoder_path builds (load_loss_decoder), without a folder of weights.
        loss_fn = E2ED2Loss(config, tiny.decode)
    else:
        vae.vae.disable_gradient_checkpointing()
        loss_fn = E2ED2Loss(config, vae.decode, decoder=vae.vae)
    loss_fn._lpips.load_state_dict(lpips_state)
    return loss_fn.to(vae.vae.dtype)


def estimate(smoke: bool, resolutions: tuple[int, ...]) -> list[dict[str, Any]]:
    dtype = torch.bfloat16
    with FakeTensorMode():
        vae = build_vae(SMOKE_VAE if smoke else SD_VAE, dtype)
        tiny = build_tiny(dtype)
    lpips_state = E2ED2Loss(BASE)._lpips.state_dict()
    rows = []
    for recipe in SMOKE_RECIPES if smoke else RECIPES:
        loss_fn = make_loss(recipe, vae, tiny, lpips_state)
        for side in (512,) if smoke else resolutions:
            for batch in SMOKE_BATCHES if smoke else BATCHES:
                started = time.perf_counter()
                peak = pixel_peak(loss_fn, batch, side, dtype, fake=True)
                rows.append(dict(resolution_px=side, recipe=recipe, batch=batch, peak_bytes=peak))
                print(
                    f"{side:5d}² {recipe:26s} batch {batch}: {peak / 2**30:7.2f} GiB "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    return rows


def real_run(smoke: bool) -> dict[str, Any]:
    """Real tensors, fp32, CPU: batch 1 and 8 at 64 px in passes of one row."""
    torch.manual_seed(0)
    vae = build_vae(SMOKE_VAE if smoke else SD_VAE, torch.float32).requires_grad_(False)
    config = dataclasses.replace(BASE, pixel_rows_per_pass=1)
    loss_fn = E2ED2Loss(config, vae.decode, decoder=vae.vae)
    peaks = {batch: pixel_peak(loss_fn, batch, 64, torch.float32, fake=False) for batch in BATCHES}
    ratio = peaks[8] / peaks[1]
    print(
        f"real CPU, 64 px, passes of 1 row: batch 1 {_common.mib(peaks[1]):.1f} MiB, batch 8 "
        f"{_common.mib(peaks[8]):.1f} MiB ({ratio:.3f}x)"
    )
    return dict(resolution_px=64, dtype="float32", peak_bytes=peaks, batch8_over_batch1=ratio)


def plot(rows: list[dict[str, Any]]):
    batches = sorted({r["batch"] for r in rows})
    figure, axes = plt.subplots(1, len(batches), figsize=(12, 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for axis, batch in zip(axes, batches, strict=True):
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            points = [
                (r["resolution_px"], r["peak_bytes"] / 2**30)
                for r in rows
                if r["recipe"] == recipe and r["batch"] == batch
            ]
            axis.plot(*zip(*points, strict=True), marker="o", label=recipe)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"batch {batch}: pixel terms' device peak (bf16)")
        axis.set_xlabel("image side (px)")
    axes[0].set_ylabel("GiB")
    axes[-1].legend(fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small VAE, 512² only")
    parser.add_argument("--real", action="store_true", help="only the real CPU batch 1 vs 8 run")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    args = parser.parse_args()
    logging.getLogger("e2ed2").setLevel(logging.ERROR)  # the random-backbone LPIPS warning
    real = real_run(args.smoke)
    if args.real:
        return
    rows = estimate(args.smoke, tuple(args.resolutions))
    payload = {
        "covers": "tensors allocated by the pixel terms' forward + backward to the final latent "
        "(decode with gradients, target decode, VGG16 LPIPS); weights and the unroll excluded",
        "full_size": {"vae": SD_VAE, "dtype": "bfloat16", "fake_tensors": True},
        "rows": rows,
        "real_cpu_run": real,
    }
    _common.write_result("pixel_terms", payload, plot(rows), smoke=args.smoke)


if __name__ == "__main__":
    main()
