"""Precompute: an image folder with captions -> latent shards for ``data.source='shards'``.

Training never runs the VAE encoder or the text encoder: both are frozen, and T5-XXL alone is
larger than the denoiser. This runs them once, PixArt-style, and stores per image

* the VAE posterior ``latent_mean`` / ``latent_std`` (unscaled; the loader draws
  ``scaling_factor * (mean + std * eps)``), and
* the text encoder's ``encoder_hidden_states`` trimmed to the caption's tokens (its mask's
  ones; the loader pads them back to (L, D) with zeros and rebuilds the (L,) mask: padding is
  never attended to, and a short caption costs its own length, not L); for an SD3 pipeline folder (``model_index.json``: StableDiffusion3Pipeline) the states of its
  own ``encode_prompt`` (CLIP-L + CLIP-G's 77 tokens, then T5's ``caption_max_tokens``) and the
  ``pooled_projections`` (D_p,), no mask (data/text.py ``encode_sd3_text``).

Once per folder it also stores ``null_condition.safetensors``: the empty prompt encoded the same
way, the unconditional half of classifier-free guidance (data/null_condition.py).

Inputs: a reader of ``image_dir`` (data/readers/: e2ed2's ``captions.jsonl`` or sidecar
``.txt`` captions, diffusers' imagefolder ``metadata.jsonl`` / ``metadata.csv``, a local
``datasets`` folder or parquet / arrow files, webdataset ``.tar`` shards; every file resolving
inside ``image_dir``, data/paths.py) yields images with captions in a fixed order. Images are
decoded as a viewer shows them (every Pillow mode, EXIF orientation, first frame;
data/images.py), resized (bicubic) to cover a target size and center-cropped to it, then scaled
to [-1, 1]. The target is ``resolution`` x ``resolution`` (``buckets="none"``), or with
``buckets="pixart"`` the aspect-ratio bucket nearest the image's (data/buckets.py: PixArt's
table around ``resolution``), so a 3:1 panorama keeps its width; each bucket's samples go to
shards of their own. Each sample also records the source image's ``original_size`` and the
stored ``crop_size`` (height, width), which PixArt-MS (1024-MS) embeds as its resolution /
aspect-ratio conditions. Tokenizers load through :func:`~e2ed2.engine.data.text.load_tokenizer`
(bare ``spiece.model`` folders too).

Bad inputs (unreadable, truncated or oversized images, missing or empty captions, metadata
lines with bad bytes or bad JSON, paths leading outside ``image_dir``, encodings with NaN/Inf)
are logged with their path (``file:line`` for a metadata line), listed under ``skipped`` in
``index.json`` and left out. Shards are written under a temporary name and renamed into place;
``index.json`` is written last, so a folder with an index is complete. The format is described
in :class:`LatentShardDataset`.

Scale (data/precompute_parallel.py): the records are encoded in chunks of ``shard_size``, each
into its own shard files, by one process, N spawned workers or the ranks of a launcher; a
rerun resumes an interrupted run, and the folder is the same byte for byte either way.

Size: over 400 lines because one pass owns the whole conversion (checks of every argument and
model folder before anything is loaded, a worker's per-chunk, per-bucket encode loop with its
finite checks, the index merged from the chunks), plus the model-folder helpers only precompute uses; inputs and decoding live in
data/readers/ and data/images.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..core.faults import FaultPlan
from . import precompute_parallel as parallel
from .buckets import BUCKET_TABLES, bucket_table
from .gemma_text import (
    encode_gemma_null,
    encode_gemma_text,
    is_gemma_pipeline,
    load_gemma_text_encoder,
)
from .images import IMAGE_EXTENSIONS, UnreadableImage, load_image, load_image_and_size
from .null_condition import NULL_PROMPT, encode_null_condition, write_null_condition
from .precompute_parallel import launcher_rank
from .readers import SOURCES, Skipped, open_reader
from .shards import INDEX_FORMAT, INDEX_VERSION, ShardWriter
from .storage import STORAGE_DTYPES, write_atomic
from .text import (
    encode_sd3_text,
    encode_text,
    is_sd3_pipeline,
    load_sd3_text_encoders,
    load_tokenizer,
)

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

__all__ = [
    "BUCKET_PATCH_SIZE",
    "IMAGE_EXTENSIONS",
    "STORAGE_DTYPES",
    "load_image",
    "load_image_and_size",
    "precompute",
]

logger = logging.getLogger(__name__)

#: Bucket sides are multiples of the VAE's downsampling times this latent patch size
#: (PixArt / DiT patchify latents 2 x 2), so every bucket's latent splits into whole patches.
BUCKET_PATCH_SIZE = 2


def precompute(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vae_path: str | os.PathLike,
    text_encoder_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    resolution: int,
    buckets: str = "none",
    caption_max_tokens: int = 120,
    batch_size: int = 8,
    shard_size: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    compute_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    source: str = "auto",
    caption_column: str | None = None,
    image_column: str | None = None,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Encodes every usable image of ``image_dir`` into shards in ``out_dir``; returns the index.

    ``vae_path``: a local diffusers ``AutoencoderKL`` folder (or a pipeline folder with
    ``vae/``). ``text_encoder_path``: a local transformers T5 encoder folder (or a pipeline folder
    with ``text_encoder/``); its tokenizer comes from ``tokenizer_path``, else from
    ``text_encoder_path`` itself, its ``tokenizer/`` subfolder or a sibling ``tokenizer/``. An SD3
    pipeline folder as ``text_encoder_path`` brings its three encoders and tokenizers (no
    ``tokenizer_path``); ``caption_max_tokens`` is then T5's ``max_sequence_length`` (SD3: 256).
    ``buckets``: "none" (``resolution`` squares) or "pixart" (aspect-ratio buckets around
    ``resolution``, sides multiples of the VAE factor x :data:`BUCKET_PATCH_SIZE`).
    ``caption_max_tokens``: 120 is PixArt-α's T5 length. ``batch_size``: images per encoder call.
    ``shard_size``: samples per shard file. ``dtype``: storage dtype of latents and text states;
    ``compute_dtype``: the encoders' dtype (T5 overflows in float16; use bfloat16 or float32).
    ``overwrite``: replace an existing shard folder (its index is removed first).
    ``source``: the reader of ``image_dir`` (data/readers/: "captions", "imagefolder", "hf",
    "webdataset", or "auto" to pick by what the folder holds); ``caption_column`` /
    ``image_column``: the metadata / dataset columns or tar members of image and caption
    (defaults per reader). ``num_processes``: worker processes spawned on this machine (each
    its own models; under a ``torchrun`` / ``deepspeed`` launcher every rank is one worker
    instead, and all ranks return the index rank 0 merged). The inputs are encoded in chunks
    of ``shard_size`` records (data/precompute_parallel.py): a rerun after an interruption
    with the same arguments keeps the finished chunks, and the folder is the same byte for
    byte for any number of processes and any interruption.
    """
    for key, value in (
        ("resolution", resolution),
        ("caption_max_tokens", caption_max_tokens),
        ("batch_size", batch_size),
        ("shard_size", shard_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {list(SOURCES)}")
    if buckets not in BUCKET_TABLES:
        raise ValueError(f"buckets={buckets!r} is not one of {list(BUCKET_TABLES)}")
    for key, chosen in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if chosen not in STORAGE_DTYPES.values():
            raise ValueError(f"{key}={chosen} is not one of {list(STORAGE_DTYPES)}")
    image_root = Path(image_dir)
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_dir {os.fspath(image_dir)!r} is not a folder")
    vae_dir = _model_folder(
        vae_path, "vae", "vae_path", "a diffusers AutoencoderKL folder (config.json + weights)"
    )
    sd3 = text_encoder_path is not None and is_sd3_pipeline(text_encoder_path)
    gemma = text_encoder_path is not None and is_gemma_pipeline(text_encoder_path)
    if sd3:
        if tokenizer_path is not None:
            raise ValueError(
                f"tokenizer_path={os.fspath(tokenizer_path)!r}: an SD3 pipeline folder as "
                "text_encoder_path brings its own three tokenizers; pass no tokenizer_path"
            )
        encoder_dir = tokenizer_dir = os.fspath(text_encoder_path)
    elif gemma:
        # Sana / SANA-Sprint (data/gemma_text.py): the pipeline's own encode_prompt.
        if tokenizer_path is not None:
            raise ValueError(
                f"tokenizer_path={os.fspath(tokenizer_path)!r}: a Sana pipeline folder as "
                "text_encoder_path brings its own Gemma tokenizer; pass no tokenizer_path"
            )
        encoder_dir = tokenizer_dir = os.fspath(text_encoder_path)
    else:
        encoder_dir = _model_folder(
            text_encoder_path,
            "text_encoder",
            "text_encoder_path",
            "a transformers T5 encoder folder (config.json + weights) or an SD3 pipeline folder",
        )
        tokenizer_dir = _tokenizer_folder(tokenizer_path, text_encoder_path, encoder_dir)
    # The reader's first record is read before the models load and the output folder is
    # touched: a missing metadata file or column fails at once, and an old folder stays.
    reader = open_reader(
        source, image_root, caption_column=caption_column, image_column=image_column
    )
    next(iter(reader), None)
    factor = _downsampling(_read_config(vae_dir))
    if resolution % factor:
        raise ValueError(
            f"resolution={resolution} must be a multiple of the VAE's downsampling factor {factor}"
        )
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
    launcher = launcher_rank()
    if launcher is not None and num_processes > 1:
        raise ValueError(
            f"num_processes={num_processes} under a launcher (WORLD_SIZE={launcher[1]}): each "
            "rank is one process already; pass no --num-processes"
        )
    rank, workers = launcher if launcher is not None else (0, num_processes)

    out = Path(out_dir)
    # Everything that decides the folder's bytes; a rerun resumes only with the same (not
    # the device: a resume may move to another).
    plan: dict[str, Any] = {
        "image_dir": os.path.abspath(image_dir),
        "source": reader.kind,
        "caption_column": caption_column,
        "image_column": image_column,
        "vae_dir": os.path.abspath(vae_dir),
        "encoder_dir": os.path.abspath(encoder_dir),
        "tokenizer_dir": os.path.abspath(tokenizer_dir),
        "sd3": sd3,
        "gemma": gemma,
        "resolution": resolution,
        "buckets": buckets,
        "caption_max_tokens": caption_max_tokens,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "dtype": _dtype_name(dtype),
        "compute_dtype": _dtype_name(compute_dtype),
    }
    job = {**plan, "out": os.fspath(out), "device": str(device), "factor": factor}
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        done = parallel.prepare(out, plan, overwrite)
        if done:
            logger.info("resuming %s: %d chunks finished before are kept", out, done)
    if launcher is not None:
        parallel.wait_for_barrier()
    if rank != 0:
        _encode_worker(job, rank, workers)
        return parallel.wait_for_index(out)

    # images/s and, where the reader knows its length, the ETA (workers report, this polls)
    bar = tqdm(total=reader.total, desc="precompute", unit="img", disable=not progress)
    try:
        states = parallel.run_workers(
            out,
            workers,
            _encode_worker,
            (job,),
            bar,
            in_process=launcher is not None or workers == 1,
            own_rank=rank,
        )
    finally:
        bar.close()
    index = _merge(out, job, states, reader)
    if index["num_samples"] == 0:
        # Finished, with nothing to keep: the folder goes back to holding no run.
        parallel.clean_up(out, set())
        (out / "null_condition.safetensors").unlink(missing_ok=True)
        raise ValueError(
            f"no usable images in {os.fspath(image_dir)!r} ({index['source']['images_found']} "
            f"found, {len(index['skipped'])} skipped; see the warnings)"
        )
    write_atomic(out / "index.json", json.dumps(index, indent=2).encode())
    parallel.clean_up(out, {shard["file"] for shard in index["shards"]})
    return index


def _merge(
    out: Path, job: dict[str, Any], states: list[dict[str, Any]], reader: Any
) -> dict[str, Any]:
    """index.json from every chunk's manifest, in chunk order: buckets numbered as their first
    rows appear (as one process would), shards and skipped inputs listed in that order."""
    records = int(states[0]["records"])
    manifests = parallel.finished_manifests(out, records, int(job["shard_size"]))
    bucket_ids: dict[tuple[int, int], int] = {}
    bucket_shapes: dict[int, dict[str, list[int]]] = {}
    counts: dict[int, int] = {}
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    found = 0
    for manifest in manifests:
        found += int(manifest["images_found"])
        skipped.extend(manifest["skipped"])
        local = []
        for bucket in manifest["buckets"]:
            crop = (int(bucket["height"]), int(bucket["width"]))
            number = bucket_ids.setdefault(crop, len(bucket_ids))
            bucket_shapes.setdefault(number, bucket["shapes"])
            local.append(number)
        for shard in manifest["shards"]:
            number = local[shard["bucket"]]
            counts[number] = counts.get(number, 0) + int(shard["num_samples"])
            shards.append({**shard, "bucket": number})
    dtype = job["dtype"]
    bucket_list = [
        {
            "height": crop[0],
            "width": crop[1],
            "latent_shape": list(bucket_shapes[number]["latent_mean"]),
            "num_samples": counts.get(number, 0),
        }
        for crop, number in bucket_ids.items()
    ]
    latent: dict[str, Any] = {"kind": "distribution", "dtype": dtype}
    if len(bucket_list) == 1:  # one latent shape: readable where buckets are not known
        latent["shape"] = bucket_list[0]["latent_shape"]
    shapes = bucket_shapes.get(0, {})
    text_index: dict[str, Any] = {
        "shape": list(shapes.get("encoder_hidden_states", [])),
        "dtype": dtype,
        "max_tokens": job["caption_max_tokens"],
    }
    if job["sd3"]:
        text_index.update(pooled_dim=shapes.get("pooled_projections", [0])[0], attention_mask=False)
    else:
        text_index["packed"] = True
    models = json.loads((parallel.state_dir(out) / "models.json").read_text())
    # No time stamp: a resumed folder must equal an uninterrupted one byte for byte.
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "num_samples": sum(counts.values()),
        "shards": shards,
        "latent": latent,
        "bucket_table": job["buckets"],
        "buckets": bucket_list,
        "text": text_index,
        "resolution": job["resolution"],
        "vae": models["vae"],
        "text_encoder": {
            "class": models["text_encoder_class"],
            "path": job["encoder_dir"],
            "tokenizer": job["tokenizer_dir"],
        },
        "source": {
            "image_dir": job["image_dir"],
            "reader": reader.kind,
            "images_found": found,
            **reader.describe(),
        },
        "compute_dtype": job["compute_dtype"],
        "skipped": skipped,
    }


def _encode_worker(job: dict[str, Any], worker: int, workers: int) -> None:
    """Worker ``worker`` of ``workers``: encodes chunks ``c`` with ``c % workers == worker`` that
    have no manifest yet; worker 0 also writes the null condition and the models' description.
    Models load only when a chunk needs them (a resumed worker may need none)."""
    device = _worker_device(job["device"], worker, workers)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # CPU kernels' results depend on their thread count (the tiny test VAE's latents: up
        # to 2.4e-4 apart between 1 and 2 threads), so every worker computes with one thread,
        # whatever the number of workers: the bytes stay the same for any N; more cores are
        # used through more processes.
        torch.set_num_threads(1)
    try:
        _encode_chunks(job, device, worker, workers)
    finally:
        torch.set_num_threads(threads)  # an in-process worker: the caller's setting back


def _encode_chunks(job: dict[str, Any], device: torch.device, worker: int, workers: int) -> None:
    out = Path(job["out"])
    reader = open_reader(
        job["source"],
        job["image_dir"],
        caption_column=job["caption_column"],
        image_column=job["image_column"],
    )
    progress = parallel.ProgressFile(out, worker)
    encoder: _ChunkEncoder | None = None
    records = 0
    for chunk, chunk_records in parallel.chunks(reader, int(job["shard_size"])):
        records += len(chunk_records)
        if chunk % workers != worker:
            continue
        manifest = parallel.read_manifest(out, chunk)
        if manifest is None:
            encoder = encoder or _ChunkEncoder(job, device, worker)
            manifest = encoder.encode(chunk, chunk_records, progress)
            parallel.maybe_fail(chunk)  # test hook: shards written, manifest not yet
            parallel.publish_manifest(out, chunk, manifest)
            progress.chunks_encoded.append(chunk)
            logger.info(
                "chunk %d encoded: %d samples in %d files",
                chunk,
                sum(shard["num_samples"] for shard in manifest["shards"]),
                len(manifest["shards"]),
            )
        else:
            progress.add(int(manifest["images_found"]))
    if worker == 0:
        encoder = encoder or _ChunkEncoder(job, device, worker)
        encoder.write_null_condition()
        write_atomic(
            parallel.state_dir(out) / "models.json", json.dumps(encoder.describe()).encode()
        )
    progress.finish(records)


def _worker_device(device: str, worker: int, workers: int) -> torch.device:
    """``cuda`` without an index gives each of several workers its own GPU (by local rank)."""
    resolved = torch.device(device)
    if resolved.type != "cuda" or resolved.index is not None or workers == 1:
        return resolved
    local = int(os.environ.get("LOCAL_RANK", worker))
    return torch.device("cuda", local % max(torch.cuda.device_count(), 1))


class _ChunkEncoder:
    """A worker's models and the encoding of one chunk into its shard files."""

    def __init__(self, job: dict[str, Any], device: torch.device, worker: int = 0) -> None:
        self.job, self.device = job, device
        # Test hook (core/faults.py's nan_latent): the VAE calls of this worker, counted.
        self.faults, self.worker, self.vae_calls = FaultPlan.from_env(), worker, 0
        self.out = Path(job["out"])
        self.dtype = STORAGE_DTYPES[job["dtype"]]
        self.sd3, self.gemma = bool(job["sd3"]), bool(job["gemma"])
        self.vae, self.encoder, self.tokenizer = _load_models(
            job["vae_dir"],
            job["encoder_dir"],
            job["tokenizer_dir"],
            device,
            STORAGE_DTYPES[job["compute_dtype"]],
            sd3=self.sd3,
            gemma=self.gemma,
        )
        self.table = (
            None
            if job["buckets"] == "none"
            else bucket_table(job["buckets"], job["resolution"], job["factor"] * BUCKET_PATCH_SIZE)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "vae": {
                "class": type(self.vae).__name__,
                "path": self.job["vae_dir"],
                "scaling_factor": self.vae.config.scaling_factor,
                "shift_factor": getattr(self.vae.config, "shift_factor", None),
            },
            "text_encoder_class": type(self.encoder).__name__,
        }

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The stored text tensors of ``captions``: T5 states + mask, or SD3's states + pooled."""
        max_tokens, device = int(self.job["caption_max_tokens"]), self.device
        if self.sd3:
            states, pooled = encode_sd3_text(self.encoder, captions, max_tokens, device=device)
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        if self.gemma:
            states, mask = encode_gemma_text(self.encoder, captions, max_tokens, device=device)
            return {"encoder_hidden_states": states, "encoder_attention_mask": mask.bool()}
        states, mask = encode_text(
            self.tokenizer, self.encoder, captions, max_tokens, device=device
        )
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask.bool()}

    def write_null_condition(self) -> None:
        """Classifier-free guidance's unconditional half: "" as the pipeline encodes it."""
        max_tokens = int(self.job["caption_max_tokens"])
        if self.sd3:  # SD3's negative prompt "" through the same encode_prompt: states, pooled
            null = self.encode_captions([NULL_PROMPT])
            write_null_condition(
                self.out,
                null["encoder_hidden_states"],
                None,
                self.dtype,
                pooled=null["pooled_projections"],
            )
        elif self.gemma:  # SanaPipeline's negative prompt "": no instruction, max_tokens long
            states, mask = encode_gemma_null(self.encoder, max_tokens, device=self.device)
            write_null_condition(self.out, states, mask, self.dtype)
        else:
            states, mask = encode_null_condition(
                self.tokenizer, self.encoder, max_tokens, self.device
            )
            write_null_condition(self.out, states, mask, self.dtype)

    def encode(
        self, chunk: int, records: list[Any], progress: parallel.ProgressFile
    ) -> dict[str, Any]:
        """Encodes one chunk's records into its shard files; returns its manifest."""
        dtype, device = self.dtype, self.device
        compute_dtype = STORAGE_DTYPES[self.job["compute_dtype"]]
        batch_size = int(self.job["batch_size"])
        skipped: list[dict[str, str]] = []

        def skip(path: str, reason: str) -> None:
            logger.warning("skipping %s: %s", path, reason)
            skipped.append({"path": path, "reason": reason})

        # Masked text (T5) is stored trimmed to each caption's tokens; SD3 attends to its padding.
        writer = ShardWriter(
            self.out,
            int(self.job["shard_size"]),
            dtype,
            pack_text=not self.sd3,
            file_name=lambda part: parallel.chunk_file_name(chunk, part),
        )
        # Per bucket (crop (height, width) in pixels): images waiting for the encoders, as
        # (name, caption, pixels, original (h, w)); a VAE call takes one shape.
        waiting: dict[tuple[int, int], list[tuple[str, str, torch.Tensor, tuple[int, int]]]] = {}
        bucket_ids: dict[tuple[int, int], int] = {}  # numbered as their first rows are stored

        def flush(crop: tuple[int, int]) -> None:
            pending = waiting.get(crop)
            if not pending:
                return
            pixels = torch.stack([p for _, _, p, _ in pending]).to(device, compute_dtype)
            captions = [c for _, c, _, _ in pending]
            with torch.no_grad():
                latent_mean, latent_std = _latent_moments(self.vae.encode(pixels))
                self.vae_calls += 1
                if self.faults.hits("nan_latent", step=self.vae_calls, rank=self.worker):
                    latent_mean[0, 0, 0, 0] = float("nan")
                text = self.encode_captions(captions)
            encoded = {
                "latent_mean": latent_mean,
                "latent_std": latent_std,
                **text,
                "original_size": torch.tensor([size for *_, size in pending], dtype=torch.int32),
                "crop_size": torch.tensor(
                    [list(pixels.shape[-2:])] * len(pending), dtype=torch.int32
                ),
            }
            # Checked as stored: a value finite in compute_dtype can overflow the storage dtype.
            finite = torch.ones(len(pending), dtype=torch.bool)
            for name in ("latent_mean", "latent_std", *text.keys() - {"encoder_attention_mask"}):
                stored = encoded[name].detach().to("cpu", dtype)
                finite &= torch.isfinite(stored.flatten(1)).all(dim=1)
            for ok, (name, *_) in zip(finite.tolist(), pending, strict=True):
                if not ok:
                    skip(
                        name,
                        f"non-finite latent or text embedding (NaN/Inf) when stored as {dtype}",
                    )
            keep = finite.nonzero().flatten()
            if keep.numel():
                writer.add(
                    {k: v[keep.to(v.device)] for k, v in encoded.items()},
                    [captions[i] for i in keep.tolist()],
                    [pending[i][0] for i in keep.tolist()],
                    bucket=bucket_ids.setdefault(crop, len(bucket_ids)),
                )
            pending.clear()

        found = 0  # images met, usable or not (metadata lines are no images)
        for record in records:
            if isinstance(record, Skipped):
                found += record.sample
                progress.add(int(record.sample))
                skip(record.name, record.reason)
                continue
            found += 1
            progress.add(1)
            try:
                pixels, size = load_image_and_size(record.image, self.job["resolution"], self.table)
            except UnreadableImage as error:  # truncated, corrupt, a bomb, no display range
                skip(record.name, str(error))
                continue
            crop = (pixels.shape[-2], pixels.shape[-1])
            waiting.setdefault(crop, []).append((record.name, record.caption, pixels, size))
            if len(waiting[crop]) == batch_size:
                flush(crop)
        for crop in list(waiting):
            flush(crop)
        writer.close()
        buckets = [
            {
                "height": crop[0],
                "width": crop[1],
                "shapes": {k: list(v) for k, v in writer.shapes[number].items()},
            }
            for crop, number in bucket_ids.items()
        ]
        return {
            "chunk": chunk,
            "records": len(records),
            "images_found": found,
            "shards": writer.shards,
            "buckets": buckets,
            "skipped": skipped,
        }


def _read_config(model_dir: str) -> dict[str, Any]:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _model_folder(path: str | os.PathLike | None, subfolder: str, key: str, expected: str) -> str:
    """The folder holding ``config.json``: ``path`` itself or ``path/subfolder`` (a pipeline)."""
    if path is None:
        raise ValueError(f"{key} is required: {expected}")
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{key} {root!r} does not exist; expected {expected}")
    for candidate in (root, os.path.join(root, subfolder)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(
        f"{key} {root!r} has no config.json (nor {subfolder}/config.json); expected {expected}"
    )


def _tokenizer_folder(
    tokenizer_path: str | os.PathLike | None,
    text_encoder_path: str | os.PathLike,
    encoder_dir: str,
) -> str:
    if tokenizer_path is not None:
        candidates = [os.fspath(tokenizer_path)]
    else:
        root = os.fspath(text_encoder_path)
        candidates = [
            encoder_dir,
            os.path.join(root, "tokenizer"),
            os.path.join(os.path.dirname(os.path.abspath(encoder_dir)), "tokenizer"),
        ]
    markers = ("tokenizer_config.json", "tokenizer.json", "spiece.model")
    for candidate in candidates:
        if any(os.path.isfile(os.path.join(candidate, m)) for m in markers):
            return candidate
    key = "tokenizer_path" if tokenizer_path is not None else "tokenizer (from text_encoder_path)"
    raise FileNotFoundError(
        f"{key}: no tokenizer files ({', '.join(markers)}) in {candidates}; pass tokenizer_path"
    )


def _load_models(
    vae_dir: str,
    encoder_dir: str,
    tokenizer_dir: str,
    device: torch.device,
    compute_dtype: torch.dtype,
    *,
    sd3: bool = False,
    gemma: bool = False,
) -> tuple[Any, Any, Any]:
    """The VAE, the text encoder and its tokenizer; ``sd3``: the encoder is the SD3 pipeline's
    text half (three encoders and tokenizers) and the tokenizer None."""
    # lazy: transformers adds ~1 s over torch and diffusers ~3 s; only loading the encoders
    # needs them
    import transformers
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    # safetensors only: a pickled .bin can run code when loaded.
    # As a torch Module: diffusers' wrapped ModelMixin.to types without its bound self.
    vae: torch.nn.Module = _autoencoder_class(vae_dir, AutoencoderKL).from_pretrained(
        vae_dir, torch_dtype=compute_dtype, use_safetensors=True
    )
    if gemma:
        vae.to(device).eval().requires_grad_(False)
        return vae, load_gemma_text_encoder(encoder_dir, device, compute_dtype), None
    if sd3:
        vae.to(device).eval().requires_grad_(False)
        return vae, load_sd3_text_encoders(encoder_dir, device, compute_dtype), None
    # transformers 5 renamed torch_dtype to dtype.
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    dtype_kwargs: dict[str, Any] = {dtype_key: compute_dtype}
    encoder = T5EncoderModel.from_pretrained(encoder_dir, use_safetensors=True, **dtype_kwargs)
    tokenizer = load_tokenizer(tokenizer_dir)
    vae.to(device).eval().requires_grad_(False)
    # transformers wraps Module.to with functools.wraps, whose type loses the bound self.
    encoder.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    return vae, encoder, tokenizer


def _autoencoder_class(vae_dir: str, default: type) -> type[ModelMixin]:
    """The VAE folder's diffusers class: ``AutoencoderKL`` or Sana's ``AutoencoderDC``."""
    # lazy: diffusers adds ~3 s over torch; only loading the VAE needs it
    import diffusers

    with open(os.path.join(vae_dir, "config.json"), encoding="utf-8") as f:
        name = json.load(f).get("_class_name", default.__name__)
    if name not in ("AutoencoderKL", "AutoencoderDC"):
        raise ValueError(f"{vae_dir}/config.json: {name!r} is not AutoencoderKL / AutoencoderDC")
    return getattr(diffusers, name)


def _downsampling(config: Any) -> int:
    """The VAE's pixels per latent side: 2^(stages - 1) (AutoencoderKL: 8, Sana's DC-AE: 32)."""
    stages = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    return 2 ** (len(stages) - 1)


def _latent_moments(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latent_mean, latent_std)`` of a VAE ``encode`` output. An AutoencoderKL gives a
    posterior (its mean and std); Sana's AutoencoderDC a latent and no posterior: it is stored
    as the mean with std 0, so the shard format and the loader's draw
    ``scaling_factor * (mean + std * eps)`` stay as they are and give ``scaling_factor * z``
    exactly (the zeros cost one more latent-sized tensor per sample)."""
    posterior = getattr(output, "latent_dist", None)
    if posterior is not None:
        return posterior.mean, posterior.std
    return output.latent, torch.zeros_like(output.latent)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
