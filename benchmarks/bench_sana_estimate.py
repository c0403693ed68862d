"""Whole training step per rank of the Sana presets at full size (issue 22, item 7, the memory
estimate of Sana / SANA-Sprint).

Question: what does one optimizer step of ``sana_1024`` (Sana-1600M, flow Euler K = 4, guided
20-step flow teacher) and ``sana_sprint_1024`` (SANA-Sprint-1.6B, SCM K = 4, L2 from noised
latents) need per rank at 1024 px on 8 ranks (bf16, ZeRO-3)?

Method: as bench_whole_step.py: weight-free pipeline folders holding only the published
``config.json`` files (Sana_1600M_1024px's SanaTransformer2DModel, which is diffusers' default
configuration; SANA-Sprint's adds the guidance embedding and RMS qk-norm; the DC-AE
dc-ae-f32c32-sana-1.0), every model built under ``FakeTensorMode`` and the trainer's own step
run by ``e2ed2.engine.train.step_estimate.estimate_step`` with the live-tensor tracker. The
latent is 32 x 32 (1024 px through the 32x DC-AE: the transformer's sample_size).

Caveats of the estimate as it stands (train/fake_step.py, train/step_estimate.py): without a
data folder it takes 120 text tokens for a class it does not know (Sana encodes 300; the text
states are 300 x 2304 x 2 B = 1.3 MiB per sample, the cross-attention's share of the unroll is
small beside 4096 image tokens), and its summary line prints 8x the latent side as the pixel
size (256 px here; the DC-AE makes it 1024).

    python benchmarks/bench_sana_estimate.py           # results/sana_estimate.json (+ .png)
    python benchmarks/bench_sana_estimate.py --smoke   # 2-layer transformers (seconds)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from bench_whole_step import estimate_cell, write_folder  # noqa: E402

# Sana_1600M_1024px_diffusers/transformer/config.json (the published fields).
SANA_1600M = {
    "_class_name": "SanaTransformer2DModel",
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "dropout": 0.0,
    "attention_bias": False,
    "sample_size": 32,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": None,
}
SANA_SPRINT_1600M = {
    **SANA_1600M,
    "guidance_embeds": True,
    "guidance_embeds_scale": 0.1,
    "qk_norm": "rms_norm_across_heads",
}
# dc-ae-f32c32-sana-1.0-diffusers/config.json.
DC_AE = {
    "_class_name": "AutoencoderDC",
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}
WORLD_SIZE = 8


def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sana-estimate-"))
    layers = {"num_layers": 2} if args.smoke else {}
    cells = []
    for preset, transformer in (
        ("sana_1024", SANA_1600M),
        ("sana_sprint_1024", SANA_SPRINT_1600M),
    ):
        folder = write_folder(root / preset, {**transformer, **layers}, DC_AE)
        cell = estimate_cell(preset, folder, None, WORLD_SIZE, [], not args.smoke)
        cell.pop("_estimate")
        print(cell["table"] or f"{preset}: {cell['peak_device_bytes'] / 2**30:.2f} GiB")
        cells.append(cell)
    result = {
        "question": "whole step per rank of the Sana presets at 1024 px, 8 ranks",
        "covers": "ZeRO-3 state, EMA, frozen VAE / teacher, gathered weights, buckets, the "
        "measured unroll + objective + backward (weight-free config.json folders, fake tensors)",
        "cells": cells,
    }
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([c["preset"] for c in cells], [c["peak_device_bytes"] / 2**30 for c in cells])
    ax.set_xlabel("peak device GiB per rank (1024 px, ZeRO-3 x 8, bf16)")
    _common.write_result("sana_estimate", result, fig, smoke=args.smoke)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2-layer transformers (seconds)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
