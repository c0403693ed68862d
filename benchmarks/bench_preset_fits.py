"""Whole step per rank of the presets the two other whole-step benchmarks leave out.

Question: do ``pixart_sigma_1024`` and the prompt-only presets (``pixart_alpha_512_prompts``,
``sd3_medium_512_prompts``, ``sana_1024_prompts``) fit the GPUs their ``# fits:`` header
states? ``bench_whole_step.py`` covers the PixArt-α / SD3 / LoRA presets and
``bench_sana_estimate.py`` the two Sana presets; this one reuses their weight-free config.json
folders (PixArt-α XL/2 at sample_size 128 with the SDXL VAE's scaling for PixArt-Σ; Sana-1600M
with the f32c32 DC-AE) and the same estimate: every model built from its config.json under fake
tensors, the trainer's own step, the live-tensor tracker (train/step_estimate.py). Text shapes
come from the family record (PixArt-Σ and Sana: 300 tokens), as no data folder is given.

    python benchmarks/bench_preset_fits.py            # results/preset_fits.json (+ .png)
    python benchmarks/bench_preset_fits.py --smoke    # 2-layer models, one preset
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
from bench_sana_estimate import DC_AE, SANA_1600M  # noqa: E402
from bench_whole_step import (  # noqa: E402
    PIXART_XL_2,
    SD3_MEDIUM,
    SD3_VAE,
    SD_VAE,
    estimate_cell,
    stated_fit,
    write_folder,
)

from e2ed2.engine.train.step_estimate import check_fits  # noqa: E402

GIB = 2**30
# The SDXL VAE PixArt-Σ ships: the SD VAE's architecture with another scaling factor.
SDXL_VAE = {**SD_VAE, "scaling_factor": 0.13025}
# preset -> (transformer config.json, vae config.json, model_index.json pipeline class or None)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any], str | None]] = {
    "pixart_sigma_1024": ({**PIXART_XL_2, "sample_size": 128}, SDXL_VAE, "PixArtSigmaPipeline"),
    "pixart_alpha_512_prompts": ({**PIXART_XL_2, "sample_size": 64}, SD_VAE, None),
    "sd3_medium_512_prompts": (SD3_MEDIUM, SD3_VAE, None),
    "sana_1024_prompts": (SANA_1600M, DC_AE, None),
}


def main(args: argparse.Namespace) -> dict[str, Any]:
    import json

    root = Path(tempfile.mkdtemp(prefix="preset-fits-"))
    layers = {"num_layers": 2} if args.smoke else {}
    names = list(PRESETS)[:1] if args.smoke else list(PRESETS)
    cells = []
    for preset in names:
        transformer, vae, pipeline = PRESETS[preset]
        folder = write_folder(root / preset, {**transformer, **layers}, vae)
        if pipeline is not None:  # the family comes from the pipeline folder, as for users
            (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        gpus, gb = stated_fit(preset) or (8, 80.0)
        cell = estimate_cell(preset, folder, None, gpus, [], lines=not args.smoke)
        estimate = cell.pop("_estimate")
        cell["stated"] = {"gpus": gpus, "gb": gb}
        cell["fits_stated"] = check_fits(estimate, gb * 1e9 / GIB) is None
        print(cell["table"] or "", flush=True)
        print(
            f"{preset}: {cell['peak_device_bytes'] / GIB:.2f} GiB per rank on {gpus} x {gb:g} GB "
            f"({cell['seconds']:.0f} s); fits its header: {cell['fits_stated']}",
            flush=True,
        )
        cells.append(cell)
    result = {
        "question": "whole step per rank of pixart_sigma_1024 and the prompt-only presets",
        "covers": "ZeRO state for the stated world size, EMA, frozen VAE / teacher, gathered "
        "weights, buckets, the measured unroll + objective + backward (weight-free config.json "
        "folders, fake tensors); text precomputed",
        "cells": cells,
    }
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([c["preset"] for c in cells], [c["peak_device_bytes"] / GIB for c in cells])
    ax.set_xlabel("peak device GiB per rank (stated world size, bf16)")
    _common.write_result("preset_fits", result, fig, smoke=args.smoke)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2-layer models, one preset")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
