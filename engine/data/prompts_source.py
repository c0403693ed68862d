"""Prompt-only data (``data.source = "prompts"``): a prompt list encoded once into a folder, for
objectives that need no image (teacher targets, rewards): written by ``e2ed2 encode-prompts``
(:func:`encode_prompt_folder`), read for training by :class:`PromptDataset`.

Folder layout (``index.json`` is written last, so its presence means the folder is complete)::

    index.json                   {"format": "e2ed2-prompts", "version": 1, "num_samples": N,
                                  "shards": [{"file": "prompts-00000.safetensors",
                                              "num_samples": n}, ...],
                                  "text": {"shape": [L, D], "dtype": "float16",
                                           "max_tokens": L_T5, "attention_mask": true,
                                           "pooled_dim": D_p (SD3 only)},
                                  "latent": {"channels": C, "downsample": f},
                                  "vae": {"path": ..., "scaling_factor": ...,
                                          "shift_factor": ...},
                                  "text_encoder": {"path": ..., "tokenizer": ...},
                                  "source": {"prompts_file": ...}, "created": ...}
    prompts-00000.safetensors    encoder_hidden_states (n, L, D), encoder_attention_mask (n, L)
                                 bool (absent for SD3), pooled_projections (n, D_p) (SD3 only);
                                 metadata "captions": JSON list of the n prompts
    null_condition.safetensors   the empty prompt, encoded alike (data/null_condition.py)

The text tensors are exactly what ``e2ed2 precompute`` stores for a caption (the same
:class:`~e2ed2.engine.data.prompt_encoder.PromptEncoder` calls). No image: the latent shape is
``(C, data.resolution / f, data.resolution / f)``, C and f read from the VAE's config.json at
encoding time, and every item's ``latents`` is that many zeros: the trajectory starts from pure
noise and only its shape is read (the config refuses every term that would compare against it).
"""

from __future__ import annotations

import bisect
import json
import os
import time
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.utils.data import Dataset

from ..config.data import DataConfig
from ..core.models import resolve_model_folder
from .gemma_text import is_gemma_pipeline
from .null_condition import read_null_condition, write_null_condition
from .paths import ConfinedRoot, PathOutsideRoot
from .prompt_encoder import PromptEncoder
from .prompt_file import read_prompts
from .seeding import unpack_key
from .storage import STORAGE_DTYPES, write_atomic
from .text import is_sd3_pipeline

__all__ = ["PROMPTS_FORMAT", "PromptDataset", "encode_prompt_folder", "read_prompt_index"]

PROMPTS_FORMAT = "e2ed2-prompts"
PROMPTS_VERSION = 1


def encode_prompt_folder(
    prompts_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    text_encoder_path: str | os.PathLike,
    vae_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    caption_max_tokens: int = 120,
    batch_size: int = 32,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float16,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Encodes every prompt of ``prompts_file`` (.txt / .jsonl) into ``out_dir``; returns the
    index. ``text_encoder_path``: a T5 folder or a pipeline folder with ``text_encoder/`` (or an
    SD3 pipeline folder); ``vae_path``: an AutoencoderKL folder or a pipeline folder with
    ``vae/`` (only its config.json is read). Raises ValueError / FileNotFoundError naming the
    bad input before anything is written."""
    prompts = read_prompts(prompts_file)
    for key, value in (
        ("caption_max_tokens", caption_max_tokens),
        ("batch_size", batch_size),
        ("shard_size", shard_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    vae_dir = resolve_model_folder(os.fspath(vae_path), "vae", "--vae")
    vae_config = json.loads((Path(vae_dir) / "config.json").read_text())
    stages = vae_config.get("block_out_channels") or vae_config.get("encoder_block_out_channels")
    if not stages or "latent_channels" not in vae_config:
        raise ValueError(f"{vae_dir}/config.json names no latent_channels / block_out_channels")
    if is_sd3_pipeline(text_encoder_path) or is_gemma_pipeline(text_encoder_path):
        # The pipeline folder itself: its encode_prompt runs (SD3: three encoders; Sana: Gemma).
        encoder_dir = os.fspath(text_encoder_path)
    else:
        encoder_dir = resolve_model_folder(
            os.fspath(text_encoder_path), "text_encoder", "--text-encoder"
        )
    if tokenizer_path is None and not (
        is_sd3_pipeline(encoder_dir) or is_gemma_pipeline(encoder_dir)
    ):
        parent = Path(os.fspath(text_encoder_path)) / "tokenizer"
        tokenizer_path = parent if parent.is_dir() else encoder_dir
    out = Path(out_dir)
    if (out / "index.json").exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds an encoded folder (index.json); pass --overwrite to replace it"
        )
    encoder = PromptEncoder(
        encoder_dir,
        tokenizer_dir=tokenizer_path,
        max_tokens=caption_max_tokens,
        device=device,
        dtype=compute_dtype,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # an overwritten folder is incomplete until done

    shards, shapes = [], {}
    for number, start in enumerate(range(0, len(prompts), shard_size)):
        chunk = prompts[start : start + shard_size]
        parts = [
            encoder.encode(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)
        ]
        tensors = {
            name: torch.cat([p[name] for p in parts]).to("cpu").contiguous() for name in parts[0]
        }
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                if not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"{name} of prompts {start}..{start + len(chunk) - 1}: NaN/Inf"
                    )
                tensors[name] = tensor.to(dtype)
            shapes[name] = list(tensor.shape[1:])
        name = f"prompts-{number:05d}.safetensors"
        write_atomic(out / name, save(tensors, metadata={"captions": json.dumps(chunk)}))
        shards.append({"file": name, "num_samples": len(chunk)})
    null = encoder.encode_null()
    write_null_condition(
        out,
        null["encoder_hidden_states"],
        null.get("encoder_attention_mask"),
        dtype,
        pooled=null.get("pooled_projections"),
    )
    text = {
        "shape": shapes["encoder_hidden_states"],
        "dtype": next(k for k, v in STORAGE_DTYPES.items() if v == dtype),
        "max_tokens": caption_max_tokens,
        "attention_mask": not encoder.sd3,
    }
    if encoder.sd3:
        text["pooled_dim"] = shapes["pooled_projections"][0]
    index = {
        "format": PROMPTS_FORMAT,
        "version": PROMPTS_VERSION,
        "num_samples": len(prompts),
        "shards": shards,
        "text": text,
        "latent": {
            "channels": int(vae_config["latent_channels"]),
            # AutoencoderKL: block_out_channels; Sana's AutoencoderDC: encoder_block_out_channels.
            "downsample": 2 ** (len(stages) - 1),
        },
        "vae": {
            "path": os.path.abspath(vae_dir),
            "scaling_factor": vae_config.get("scaling_factor"),
            "shift_factor": vae_config.get("shift_factor"),
        },
        "text_encoder": {
            "path": os.path.abspath(encoder.encoder_dir),
            "tokenizer": os.path.abspath(encoder.tokenizer_dir),
        },
        "source": {"prompts_file": os.path.abspath(prompts_file)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(out / "index.json", json.dumps(index, indent=2).encode())
    return index


def read_prompt_index(root: str | os.PathLike) -> dict[str, Any]:
    """``root/index.json`` of a prompt folder; ValueError / FileNotFoundError name the folder."""
    path = Path(root) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"data.prompt_dir {os.fspath(root)!r} has no index.json: encode a prompt file into "
            "it with `e2ed2 encode-prompts PROMPTS.txt DIR --text-encoder ... --vae ...`"
        )
    try:
        # index.json itself may not be a link out of the folder (data/paths.py).
        confined = ConfinedRoot(root, "data.prompt_dir")
        index = json.loads(confined.resolve("index.json").read_text())
    except PathOutsideRoot as error:
        raise ValueError(f"{path}: {error}") from None
    except ValueError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if index.get("format") != PROMPTS_FORMAT or index.get("version") != PROMPTS_VERSION:
        raise ValueError(
            f"{path} is not an e2ed2 prompt folder (format {index.get('format')!r}, version "
            f"{index.get('version')!r}; expected {PROMPTS_FORMAT!r} {PROMPTS_VERSION}); "
            "latent shards are data.source='shards'"
        )
    return index


class PromptDataset(Dataset):
    """The items of a prompt folder: its text tensors (float32 / long), zero ``latents`` of the
    configured resolution's latent shape, PixArt-MS's size conditions of that square and the
    global ``index``. Shards are opened lazily (memory-mapped) once per process."""

    def __init__(self, config: DataConfig) -> None:
        if config.source != "prompts" or not config.prompt_dir:
            raise ValueError("PromptDataset needs data.source='prompts' and data.prompt_dir")
        self.root = os.fspath(config.prompt_dir)
        self.index = read_prompt_index(self.root)
        latent = self.index["latent"]
        downsample = int(latent["downsample"])
        if config.resolution % downsample:
            raise ValueError(
                f"data.resolution={config.resolution} must be a multiple of the VAE's "
                f"downsampling factor {downsample} ({self.root}/index.json)"
            )
        side = config.resolution // downsample
        self.resolution = config.resolution
        self.latent_shape = (int(latent["channels"]), side, side)
        self.base_latent_size = side
        #: One square "bucket" (validation and sample grids read these as for shards).
        self.bucket_sizes = [(config.resolution, config.resolution)]
        self.grid_bucket = 0
        text = self.index["text"]
        # (tokens, width): the text states' shape per prompt, as the index records it.
        self.text_shape = cast(tuple[int, int], tuple(int(s) for s in text["shape"]))
        self.pooled_dim = None if text.get("pooled_dim") is None else int(text["pooled_dim"])
        self._masked = bool(text.get("attention_mask", True))
        # A file the index names is read: it must lie inside the folder (data/paths.py).
        confined = ConfinedRoot(self.root, "data.prompt_dir")
        self.shard_files = []
        for number, shard in enumerate(self.index["shards"]):
            try:
                self.shard_files.append(os.fspath(confined.resolve(shard["file"])))
            except PathOutsideRoot as error:
                raise ValueError(f"{self.root}/index.json: shards[{number}].file {error}") from None
        self._starts = [0]
        for shard in self.index["shards"]:
            self._starts.append(self._starts[-1] + int(shard["num_samples"]))
        if self._starts[-1] != int(self.index["num_samples"]) or not self._starts[-1]:
            raise ValueError(f"{self.root}/index.json: shard counts do not match num_samples")
        self.captions: list[str] = []

        for path in self.shard_files:
            with safe_open(path, framework="pt") as f:
                self.captions.extend(json.loads((f.metadata() or {}).get("captions", "[]")))
        if len(self.captions) != len(self):
            raise ValueError(f"{self.root}: the shards' captions do not match num_samples")
        self.null_condition = read_null_condition(
            self.root, self.text_shape, pooled_dim=self.pooled_dim, masked=self._masked
        )
        self._open: dict[int, Any] = {}
        self._open_pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, number: int) -> Any:
        if self._open_pid != os.getpid():  # a forked loader worker opens its own handles
            self._open, self._open_pid = {}, os.getpid()
        if number not in self._open:
            self._open[number] = safe_open(self.shard_files[number], framework="pt")
        return self._open[number]

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, _ = unpack_key(key, len(self))
        number = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[number]
        shard = self._shard(number)
        item: dict[str, Any] = {
            "latents": torch.zeros(self.latent_shape),
            "encoder_hidden_states": _row(shard, "encoder_hidden_states", row).float(),
            "index": index,
            "resolution": torch.tensor([float(self.resolution)] * 2),
            "aspect_ratio": torch.tensor([1.0]),
        }
        if self._masked:
            item["encoder_attention_mask"] = _row(shard, "encoder_attention_mask", row).long()
        if self.pooled_dim is not None:
            item["pooled_projections"] = _row(shard, "pooled_projections", row).float()
        return item


def _row(shard: Any, name: str, row: int) -> torch.Tensor:
    """Row ``row`` of a memory-mapped tensor (only that row is read)."""
    return shard.get_slice(name)[row : row + 1][0]
