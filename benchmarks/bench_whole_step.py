"""Whole training step per rank for every shipped preset, from weight-free full-size folders
(issue 26, items 4 and 5).

Question: does each shipped preset's *whole* optimizer step (ZeRO state, gathered weights,
buckets, the unroll under its policy, every objective term, EMA, frozen models) fit the GPU its
header states, at 512 / 1024 / 2048 px; and what do the peers' recipe for the same pixel loss
(AlignProp / DRaFT: decode the sample whole and backpropagate through it, with or without the
decoder's own per-block gradient checkpointing) need beside e2ed2's?

Method: the folders hold only ``config.json`` files of the published architectures (PixArt-α
XL/2 at sample_size 64 / 128, the SD VAE 128/256/512/512 with 2 layers per block, SD3-medium's
MMDiT and 16-channel VAE); text is precomputed (T5-XXL's 4096-wide states, 120 tokens for PixArt,
77 + 256 for SD3), so the text encoders are not part of the step. ``e2ed2.engine.train.
step_estimate.estimate_step`` builds every model under ``FakeTensorMode`` and runs the step as
the trainer does (train/fake_step.py) with the live-tensor tracker: nothing is modelled by hand
but the ZeRO partitions, EMA and buckets (bytes per parameter). The peers' rows run the decode +
LPIPS + backward on the final latent alone (no unroll), the decoder un-checkpointed (e2ed2's
``objective.decode_checkpoint=false``) and with diffusers' ``enable_gradient_checkpointing``.

    python benchmarks/bench_whole_step.py            # results/whole_step.json (+ .png)
    python benchmarks/bench_whole_step.py --smoke    # one preset, no sweep, no per-term lines
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from e2ed2.engine.config import load_config  # noqa: E402
from e2ed2.engine.config.presets import shipped_presets  # noqa: E402
from e2ed2.engine.core.memory import LiveTensorTracker  # noqa: E402
from e2ed2.engine.train.step_estimate import (  # noqa: E402
    check_fits,
    estimate_step,
    format_estimate,
)

GIB = 2**30
RESOLUTIONS = (512, 1024, 2048)

# The published architectures (config.json fields of the diffusers folders).
PIXART_XL_2 = {
    "_class_name": "PixArtTransformer2DModel",
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "patch_size": 2,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "interpolation_scale": None,
}
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD3_MEDIUM = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
SD3_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def write_folder(root: Path, transformer: dict[str, Any], vae: dict[str, Any]) -> Path:
    """A pipeline folder with transformer/ and vae/ config.json files only (no weights)."""
    for name, config in (("transformer", transformer), ("vae", vae)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config, indent=2))
    return root


def folders(root: Path) -> dict[str, Path]:
    return {
        "pixart_512": write_folder(root / "pixart-512", {**PIXART_XL_2, "sample_size": 64}, SD_VAE),
        "pixart_1024": write_folder(
            root / "pixart-1024", {**PIXART_XL_2, "sample_size": 128}, SD_VAE
        ),
        "sd3_medium": write_folder(root / "sd3-medium", SD3_MEDIUM, SD3_VAE),
    }


def stated_fit(preset: str) -> tuple[int, float] | None:
    """(GPUs, GB per GPU) from the preset's ``# fits: N x G GB`` header line, if any."""
    from e2ed2.engine.config.presets import resolve_preset

    for line in Path(resolve_preset(preset)).read_text().splitlines():
        if line.startswith("# fits:"):
            gpus, _, rest = line.removeprefix("# fits:").strip().partition(" x ")
            return int(gpus), float(rest.split()[0])
    return None


def estimate_cell(
    preset: str, folder: Path, resolution: int | None, world: int, extra: list[str], lines: bool
) -> dict[str, Any]:
    overrides = [
        f"model.pretrained_path={folder}",
        f"model.vae_path={folder}",
        *extra,
    ]
    if load_config(preset).data.source == "shards":  # shapes from the transformer's config.json
        overrides.append("data.shard_dir=/nonexistent-shards")
    config = load_config(preset, overrides)
    started = time.perf_counter()
    estimate = estimate_step(config, world_size=world, resolution_px=resolution, alone_lines=lines)
    return {
        "preset": preset,
        "resolution": resolution,
        "world_size": world,
        "overrides": extra,
        "peak_device_bytes": estimate.peak_device_bytes,
        "peak_host_bytes": estimate.peak_host_bytes,
        "estimate": estimate.as_dict(),
        "table": format_estimate(estimate) if lines else None,
        "seconds": time.perf_counter() - started,
        "_estimate": estimate,
    }


def peer_decode(folder: Path, resolution: int, batch: int, *, decoder_checkpointing: bool) -> int:
    """AlignProp / DRaFT's pixel loss on the final latent: decode it whole (no whole-decoder
    checkpoint), LPIPS (VGG) on the pixels, backward to the latent; bf16, fake tensors."""
    from diffusers import AutoencoderKL

    from e2ed2.engine.config import ObjectiveConfig
    from e2ed2.engine.objectives.losses import E2ED2Loss

    mode = FakeTensorMode()
    config = json.loads((folder / "vae" / "config.json").read_text())
    config.pop("_class_name")
    side = resolution // 8
    previous = torch.get_default_dtype()
    with mode:
        torch.set_default_dtype(torch.bfloat16)
        try:
            vae = AutoencoderKL(**config).requires_grad_(False).eval()
        finally:
            torch.set_default_dtype(previous)
        if decoder_checkpointing:
            vae.enable_gradient_checkpointing()
            vae.train()  # diffusers checkpoints its blocks only in training mode
        objective = ObjectiveConfig(
            lpips_weight=1.0,
            lpips_random_backbone=True,
            lpips_checkpoint=False,
            decode_checkpoint=False,
        )
        loss_fn = E2ED2Loss(objective, lambda z: vae.decode(z).sample)
        latent = torch.randn(batch, config["latent_channels"], side, side, dtype=torch.bfloat16)
        sample = latent.clone().requires_grad_()
    with mode, LiveTensorTracker(track_cuda=False) as tracker:
        pixels = loss_fn.decode_sample(sample)
        target = loss_fn.decode_target(latent)
        loss_fn(sample, latent, sample_pixels=pixels, target_pixels=target)["total"].backward()
    return tracker.report().peak_bytes


# Presets estimated here -> the folder of their architecture (the others' families, Sana and
# PixArt-Σ, and the prompt-only data sources are not built by this script yet).
ESTIMATED = {
    "pixart_alpha_512": "pixart_512",
    "pixart_alpha_512_lora_24gb": "pixart_512",
    "pixart_alpha_1024": "pixart_1024",
    "sd3_medium_512": "sd3_medium",
}
# The 24 GB preset's batch: as large as fits one 24 GB card.
LORA_BATCHES = (8, 16, 32)
# The resolution sweep of the paper's recipe (pixart_alpha_1024: L2 + LPIPS, batch 8, K = 4):
# the pixel terms in passes of one image with per-block decoder checkpoints (as shipped) and
# before the passes (the whole batch decoded at once under one whole-decoder checkpoint).
SWEEP = {
    "passes": [],
    "before passes": [
        "objective.pixel_rows_per_pass=0",
        "objective.decode_checkpoint_blocks=false",
    ],
}


def main(args: argparse.Namespace) -> dict[str, Any]:
    presets = [p for p in ESTIMATED if p in shipped_presets()]
    if args.smoke:
        presets = presets[:1]
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = folders(Path(tmp))
        for preset in presets:
            fit = stated_fit(preset)
            world = fit[0] if fit else 8
            folder = paths[ESTIMATED[preset]]
            lines = False  # `e2ed2 estimate` prints the per-term lines; the table needs the peaks
            own = estimate_cell(preset, folder, None, world, [], lines=lines)
            own["stated"] = None if fit is None else {"gpus": fit[0], "gb": fit[1]}
            own["fits_stated"] = (
                None if fit is None else check_fits(own["_estimate"], fit[1] * 1e9 / GIB) is None
            )
            rows.append(own)
            print(own["table"] or "", flush=True)
            print(
                f"{preset}: {own['peak_device_bytes'] / GIB:.2f} GiB per rank at world size "
                f"{world} ({own['seconds']:.0f} s); fits its header: {own['fits_stated']}",
                flush=True,
            )
        lora: list[dict[str, Any]] = []
        if not args.smoke:
            for batch in LORA_BATCHES:
                cell = estimate_cell(
                    "pixart_alpha_512_lora_24gb",
                    paths["pixart_512"],
                    None,
                    1,
                    [f"run.batch_per_rank={batch}"],
                    lines=False,
                )
                cell["fits_24gb"] = check_fits(cell["_estimate"], 24e9 / GIB) is None
                lora.append(cell)
                print(
                    f"lora 24 GB batch {batch}: {cell['peak_device_bytes'] / GIB:.2f} GiB, "
                    f"fits: {cell['fits_24gb']}",
                    flush=True,
                )
            for resolution in RESOLUTIONS:
                for name, extra in SWEEP.items():
                    own = next(r for r in rows if r["preset"] == "pixart_alpha_1024")
                    if resolution == 1024 and not extra:
                        cell = {**own, "resolution": 1024}  # the preset as shipped
                    else:
                        cell = estimate_cell(
                            "pixart_alpha_1024",
                            paths["pixart_1024"],
                            resolution,
                            8,
                            extra,
                            lines=False,
                        )
                    cell["variant"] = name
                    sweep.append(cell)
                    print(
                        f"pixart_alpha_1024 {resolution} {name}: "
                        f"{cell['peak_device_bytes'] / GIB:.2f} GiB",
                        flush=True,
                    )
                for ckpt in (False, True):
                    peak = peer_decode(
                        paths["pixart_1024"], resolution, 8, decoder_checkpointing=ckpt
                    )
                    peers.append(
                        {
                            "resolution": resolution,
                            "batch": 8,
                            "decoder_checkpointing": ckpt,
                            "decode_lpips_backward_bytes": peak,
                        }
                    )
                    print(
                        f"peers {resolution} decoder ckpt={ckpt}: {peak / GIB:.2f} GiB", flush=True
                    )
    for cell in sweep + lora:
        cell.pop("_estimate", None)
    for row in rows:
        row.pop("_estimate", None)
    payload = {
        "question": "whole-step device / host peak per rank of each shipped preset "
        "(weight-free full-size config.json folders, fake tensors)",
        "covers": "per rank: ZeRO-partitioned state, gathered weights, buckets, EMA, frozen "
        "models' weights, the measured activation peak of unroll + objective + backward and of "
        "one discriminator update (max over the phases); not the CUDA context or fragmentation",
        "rows": rows,
        "sweep": sweep,
        "lora_24gb": lora,
        "peers": peers,
    }
    figure, ax = plt.subplots(figsize=(7, 3.5))
    for name in SWEEP:
        cells = [c for c in sweep if c["variant"] == name]
        ax.plot(
            [c["resolution"] for c in cells],
            [c["peak_device_bytes"] / GIB for c in cells],
            marker="o",
            label=f"e2ed2 whole step, pixart_alpha_1024 ({name})",
        )
    for ckpt in (False, True):
        cells = [p for p in peers if p["decoder_checkpointing"] == ckpt]
        if cells:
            ax.plot(
                [p["resolution"] for p in cells],
                [p["decode_lpips_backward_bytes"] / GIB for p in cells],
                linestyle="--",
                label=f"peers: decode + LPIPS alone, batch 8{' (decoder ckpt)' if ckpt else ''}",
            )
    ax.set_xlabel("image side (px)")
    ax.set_ylabel("GiB per rank")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    _common.write_result("whole_step", payload, figure, smoke=args.smoke)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one preset at 512 px (seconds)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
