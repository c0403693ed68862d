"""The latent-shard format, written by ``e2ed2 precompute`` and read for training: one module
for both sides, so the writer and the reader cannot drift apart.

Size: over 400 lines because that one format has both sides here (reader with its per-shard
checks and bad-sample replacement, writer), plus the optional size conditions of PixArt-MS and
the aspect-ratio buckets (one latent shape per bucket, one bucket per shard).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.utils.data import Dataset

from ..config.data import DataConfig
from .null_condition import read_null_condition
from .paths import ConfinedRoot, PathOutsideRoot
from .seeding import SampleKey, seeded_generator, unpack_key
from .storage import write_atomic

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "READABLE_INDEX_VERSIONS",
    "LatentShardDataset",
    "ShardWriter",
    "check_bucket_table",
    "read_index",
    "write_atomic",
]

logger = logging.getLogger(__name__)

#: ``index.json`` of a shard folder: ``format`` must equal INDEX_FORMAT, ``version`` INDEX_VERSION.
INDEX_FORMAT = "e2ed2-latent-shards"
INDEX_VERSION = 3
#: Versions read: 1 (one latent shape, no buckets), 2 (aspect-ratio buckets) and 3 (text states
#: trimmed to each caption's tokens, ``text.packed``).
READABLE_INDEX_VERSIONS = (1, 2, 3)
#: Packed text (``text.packed``): every row's real tokens, concatenated, and their counts.
PACKED_STATES, TEXT_LENGTHS = "encoder_hidden_states_packed", "text_lengths"


class LatentShardDataset(Dataset):
    """Latents and text embeddings from a folder written by ``e2ed2 precompute``.

    Folder layout (``index.json`` is written last, so its presence means the folder is complete)::

        index.json                  {"format": "e2ed2-latent-shards", "version": 3,
                                     "num_samples": N,
                                     "shards": [{"file": "shard-00000.safetensors",
                                                 "num_samples": n, "bucket": b}, ...],
                                     "latent": {"kind": "distribution" | "sample",
                                                "shape": [C, h, w], "dtype": "float16"},
                                     "bucket_table": "none" | "pixart",
                                     "buckets": [{"height": H, "width": W,
                                                  "latent_shape": [C, h, w],
                                                  "num_samples": n_b}, ...],
                                     "text": {"shape": [L, D], "dtype": "float16",
                                              "pooled_dim": D_p (SD3 only),
                                              "attention_mask": false (SD3 only),
                                              "packed": true (version 3, masked text)},
                                     "vae": {"scaling_factor": 0.18215, "shift_factor": null,
                                             ...},
                                     "skipped": [{"path": ..., "reason": ...}], ...}
        shard-00000.safetensors     latent_mean, latent_std (n, C, h, w)   ("distribution")
                                    or latents (n, C, h, w)                 ("sample")
                                    encoder_hidden_states (n, L, D)
                                    encoder_attention_mask (n, L) bool / uint8 / int (absent
                                      where text.attention_mask is false: SD3 attends to all)
                                    or, where text.packed is true, instead of both:
                                    encoder_hidden_states_packed (sum of lengths, D): each
                                      row's real tokens (its mask's ones), rows concatenated
                                    text_lengths (n,) int32, each row's token count (1..L)
                                    pooled_projections (n, D_p), where text.pooled_dim is set
                                      (SD3's pooled CLIP projections)
                                    original_size, crop_size (n, 2) int32, optional:
                                      (height, width) of the source image and of the stored
                                      crop, in pixels (PixArt-MS's size conditions)
                                    metadata: "captions" (JSON list of n strings),
                                              "files" (JSON list of n source paths, optional)
        null_condition.safetensors  optional: the empty prompt's states (1, L, D) and mask (1, L),
                                    classifier-free guidance's unconditional half (written by
                                    precompute since it guides; data/null_condition.py)

    Buckets (version 2): every shard holds the samples of one aspect-ratio bucket ``b`` (an index
    into ``buckets``: the crop's ``height`` x ``width`` in pixels and its latent shape), so shards
    of different buckets hold different latent shapes and a sample's bucket is known from the
    index alone (:attr:`sample_buckets`, for the bucketed batch sampler). ``latent.shape`` is
    written only when every sample has the same shape. Version 1 (no buckets) and a version 2
    index without ``buckets`` read as one bucket of ``latent.shape``; :func:`read_index` returns
    every index in the version 2 form.

    Packed text (version 3, ``text.packed``): a row's states are stored trimmed to its tokens
    (the padding a masked model never attends to is dropped: a 20-token caption costs 20 x D,
    not L x D); an item pads them back to (L, D) with zeros and rebuilds the mask (ones, then
    zeros), so items have the unpacked form.

    Stored latents are the VAE's raw (unscaled) outputs. An item's latent is
    ``scaling_factor * (z - shift_factor)`` with ``z = mean + std * eps`` for a distribution
    shard (``z = latents`` otherwise), as float32.

    ``eps`` is drawn from a generator seeded by ``(config.seed, epoch, index)``: a fresh posterior
    sample of every image in every epoch (the augmentation PixArt gets from sampling the latent
    distribution), yet a pure function of the key, so batches do not depend on workers and a
    resumed run sees the same latents. The epoch arrives with the key (:class:`SampleKey`); a
    plain ``int`` key means epoch 0.

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped; an item reads only
    its own rows) and at most ``config.shard_cache_size`` stay open per process.
    """

    def __init__(self, config: DataConfig) -> None:
        if config.source != "shards" or not config.shard_dir:
            raise ValueError("LatentShardDataset needs data.source='shards' and data.shard_dir")

        self.config = config
        self.root = os.fspath(config.shard_dir)
        self.index = read_index(self.root)
        latent = self.index["latent"]
        self.latent_kind: str = latent["kind"]
        buckets = self.index["buckets"]
        #: Per bucket: the crop's (height, width) in pixels and the latent's (C, h, w).
        self.bucket_sizes = [(int(b["height"]), int(b["width"])) for b in buckets]
        self.bucket_latent_shapes = [tuple(int(s) for s in b["latent_shape"]) for b in buckets]
        self.bucket_table: str = self.index["bucket_table"]
        self._text_shape = tuple(int(s) for s in self.index["text"]["shape"])
        text = self.index["text"]
        self._pooled_dim = None if text.get("pooled_dim") is None else int(text["pooled_dim"])
        self._masked = bool(text.get("attention_mask", True))
        self._packed = bool(text.get("packed", False)) and self._masked
        vae = self.index.get("vae") or {}
        self.scaling_factor = float(vae.get("scaling_factor") or 1.0)
        self.shift_factor = float(vae.get("shift_factor") or 0.0)

        self.shard_files = [os.path.join(self.root, s["file"]) for s in self.index["shards"]]
        counts = [int(s["num_samples"]) for s in self.index["shards"]]
        self._starts = [0]
        for count in counts:
            self._starts.append(self._starts[-1] + count)
        if self._starts[-1] != int(self.index["num_samples"]):
            raise ValueError(
                f"{self.root}/index.json: shard sample counts sum to {self._starts[-1]}, "
                f"but num_samples is {self.index['num_samples']}"
            )
        if self._starts[-1] == 0:
            raise ValueError(f"{self.root}/index.json lists no samples")

        shard_buckets = [int(s["bucket"]) for s in self.index["shards"]]
        #: The bucket of every sample, (N,) int64 (from the index: no tensor is read).
        self.sample_buckets = torch.repeat_interleave(
            torch.tensor(shard_buckets, dtype=torch.long), torch.tensor(counts, dtype=torch.long)
        )
        # Per bucket: its samples' indices, ascending (bad samples are replaced within them).
        self._bucket_members = [
            (self.sample_buckets == b).nonzero().flatten() for b in range(len(buckets))
        ]

        # Read every shard's header once (cheap: no tensor data) to check it against the index
        # and collect the captions. A bad shard (missing, unreadable, wrong shape or dtype) does
        # not stop training: its rows are bad samples, skipped and counted like any other.
        declared = {
            "latent": _SAFETENSORS_DTYPES.get(str(latent.get("dtype"))),
            "text": _SAFETENSORS_DTYPES.get(str(self.index["text"].get("dtype"))),
        }
        self.captions: list[str] = []
        self.files: list[str | None] = []
        #: Unusable shards: shard number -> why (every row of one is a bad sample).
        self.bad_shards: dict[int, str] = {}
        #: Packed text: per shard, (n + 1,) row offsets into its packed states.
        self._text_offsets: dict[int, torch.Tensor] = {}
        for number, (path, count) in enumerate(zip(self.shard_files, counts, strict=True)):
            expected = _expected_tensors(
                self.latent_kind,
                self.bucket_latent_shapes[shard_buckets[number]],
                self._text_shape,
                pooled_dim=self._pooled_dim,
                masked=self._masked,
                packed=self._packed,
            )
            try:
                captions, files = _check_shard(path, count, expected, declared)
                if self._packed:
                    self._text_offsets[number] = _check_packed_text(
                        path, count, self._text_shape, declared["text"]
                    )
            except Exception as error:  # safetensors/OS/JSON raise many types for broken files
                reason = (
                    str(error)
                    if isinstance(error, ValueError | FileNotFoundError)
                    else f"unreadable ({type(error).__name__}: {error})"
                )
                self.bad_shards[number] = reason
                logger.warning("bad shard %s (its %d samples are skipped): %s", path, count, reason)
                captions, files = [""] * count, [None] * count
            self.captions.extend(captions)
            self.files.extend(files)
        if len(self.bad_shards) == len(self.shard_files):
            number, reason = next(iter(self.bad_shards.items()))
            raise ValueError(
                f"{self.root}: no usable shard (first: {self.shard_files[number]}: {reason})"
            )
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._open_pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of ``item["latents"]`` in the grid bucket (:attr:`grid_bucket`): the one
        latent shape of a folder without buckets; with buckets, the shape sample grids and
        evaluation generate at, with :func:`~e2ed2.engine.data.prompts.sample_conditioning`'s
        prompts taken from that bucket."""
        return self.bucket_latent_shapes[self.grid_bucket]  # type: ignore[return-value]

    @property
    def grid_bucket(self) -> int:
        """The bucket sample grids are drawn in: the one with the most samples (on a tie, the
        one listed first), so the grid's prompts are real samples of that shape."""
        counts = [len(members) for members in self._bucket_members]
        return counts.index(max(counts))

    @property
    def largest_latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the bucket with the most latent pixels (the memory peak of a run)."""
        return max(self.bucket_latent_shapes, key=lambda shape: shape[-2] * shape[-1])  # type: ignore[return-value]

    @property
    def base_latent_size(self) -> int:
        """The latent side of the square the buckets are built around (precompute's
        ``resolution`` over the VAE's downsampling): a denoiser built from config gets it as
        ``sample_size``, its positional embedding's reference grid (PixArt interpolates for
        other shapes)."""
        height, _ = self.bucket_sizes[0]
        downsample = height // self.bucket_latent_shapes[0][-2]
        resolution = self.index.get("resolution")
        return int(resolution) // downsample if resolution else self.bucket_latent_shapes[0][-2]

    def bucket_members(self, bucket: int) -> torch.Tensor:
        """The sample indices of ``bucket``, ascending, (n_b,) int64."""
        return self._bucket_members[bucket]

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of ``item["encoder_hidden_states"]``."""
        return self._text_shape  # type: ignore[return-value]

    @property
    def pooled_dim(self) -> int | None:
        """D_p of ``item["pooled_projections"]`` (SD3's pooled text embedding), or None where
        the shards hold none."""
        return self._pooled_dim

    @property
    def null_condition(self) -> dict[str, torch.Tensor] | None:
        """The empty prompt's ``encoder_hidden_states`` (1, L, D) float32 and
        ``encoder_attention_mask`` (1, L) long (classifier-free guidance), or None where the
        folder has no ``null_condition.safetensors``."""
        return read_null_condition(
            self.root, self.text_shape, pooled_dim=self._pooled_dim, masked=self._masked
        )

    def _shard(self, shard: int) -> Any:
        if self._open_pid != os.getpid():  # a forked worker: do not share the parent's handles
            self._open = OrderedDict()
            self._open_pid = os.getpid()
        handle = self._open.get(shard)
        if handle is None:
            handle = safe_open(self.shard_files[shard], framework="pt")
            self._open[shard] = handle
            while len(self._open) > self.config.shard_cache_size:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return handle

    def __getstate__(self) -> dict[str, Any]:
        # Open safetensors handles cannot be pickled (spawned workers); they reopen lazily.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def describe(self, index: int) -> str:
        """Where sample ``index`` lives: shard file, row and (if recorded) the source image."""
        shard = bisect.bisect_right(self._starts, index) - 1
        where = f"{self.shard_files[shard]} row {index - self._starts[shard]}"
        source = self.files[index]
        return f"{where} (source {source})" if source else where

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        """The item of ``key``; a bad sample is replaced by the next good one of its bucket (in
        index order).

        ``bad_count`` (0 or 1) says whether the drawn sample was bad and ``bad_sample`` where it
        lives and why (empty if good), so the trainer can count and log it; the replacement keeps
        every batch full, so all ranks run the same collective operations.
        """
        index, epoch = unpack_key(key, len(self))
        # Replacements come from the drawn sample's bucket, so a batch keeps one latent shape.
        members = self._bucket_members[int(self.sample_buckets[index])]
        position = int(torch.searchsorted(members, index))
        drawn_problem = None
        for offset in range(len(members)):
            candidate = int(members[(position + offset) % len(members)])
            try:
                item = self._read(candidate, epoch)
                problem = _non_finite(item)
            except _BadShard as error:
                problem = str(error)
            except Exception as error:  # a shard broken past its header
                problem = f"unreadable ({type(error).__name__}: {error})"
            if offset == 0 and problem is not None:
                drawn_problem = f"{self.describe(index)}: {problem}"
            if problem is None:
                break
        else:
            bucket = int(self.sample_buckets[index])
            where = f" in bucket {bucket}" if len(self.bucket_sizes) > 1 else ""
            raise ValueError(f"{self.root}: no usable sample left{where} (last: {drawn_problem})")
        item["bad_count"] = 0 if drawn_problem is None else 1
        item["bad_sample"] = drawn_problem or ""
        return item

    def _read(self, index: int, epoch: int) -> dict[str, Any]:
        shard = bisect.bisect_right(self._starts, index) - 1
        if shard in self.bad_shards:
            raise _BadShard(self.bad_shards[shard])
        row = index - self._starts[shard]
        handle = self._shard(shard)

        def read(name: str) -> torch.Tensor:
            return handle.get_slice(name)[row : row + 1][0]

        if self.latent_kind == "distribution":
            mean = read("latent_mean").float()
            std = read("latent_std").float()
            eps = torch.randn(
                mean.shape, generator=seeded_generator(self.config.seed, "latent-eps", epoch, index)
            )
            z = mean + std * eps
        else:
            z = read("latents").float()
        latents = self.scaling_factor * (z - self.shift_factor)
        item = {
            "latents": latents,
            **self._size_conditions(handle, read, latents.shape),
            "index": index,
        }
        if self._packed:  # the caption's tokens, padded to L with zeros (masked out)
            start, end = self._text_offsets[shard][row : row + 2].tolist()
            length, width = self._text_shape
            states = torch.zeros(length, width)
            states[: end - start] = handle.get_slice(PACKED_STATES)[start:end].float()
            mask = torch.zeros(length, dtype=torch.long)
            mask[: end - start] = 1
            item.update(encoder_hidden_states=states, encoder_attention_mask=mask)
        else:
            item["encoder_hidden_states"] = read("encoder_hidden_states").float()
            if self._masked:
                item["encoder_attention_mask"] = read("encoder_attention_mask").long()
        if self._pooled_dim is not None:
            item["pooled_projections"] = read("pooled_projections").float()
        return item

    def _size_conditions(self, handle: Any, read: Any, latent_shape: Any) -> dict[str, Any]:
        """PixArt-MS's conditions of one sample (float32): ``resolution`` (2,) = the original
        image's (height, width) in pixels, ``aspect_ratio`` (1,) = the stored crop's height /
        width, as PixArt's multi-scale training feeds them. Shards written before precompute
        recorded sizes fall back to the stored image size (index ``resolution``, else the
        latent size times the VAE's downsampling of 8)."""
        names = handle.keys()
        if "original_size" in names and "crop_size" in names:
            original = read("original_size").float()
            crop = read("crop_size").float()
        else:
            side = self.index.get("resolution")
            crop = (
                torch.tensor([float(side), float(side)])
                if side
                else torch.tensor([8.0 * latent_shape[-2], 8.0 * latent_shape[-1]])
            )
            original = crop
        return {"resolution": original, "aspect_ratio": crop[:1] / crop[1:]}


class _BadShard(Exception):
    def __str__(self) -> str:
        return f"in a bad shard: {self.args[0]}"


# index.json dtype names -> safetensors header dtype names.
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
_FLOAT_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())
_MASK_DTYPES = frozenset({"BOOL", "U8", "I8", "I16", "I32", "I64"})


def _check_shard(
    path: str,
    count: int,
    expected: dict[str, tuple[int, ...]],
    declared: dict[str, str | None],
) -> tuple[list[str], list[str | None]]:
    """A shard's captions and source files, after checking its header against the index."""
    if not os.path.isfile(path):
        raise FileNotFoundError("listed in index.json but missing")
    with safe_open(path, framework="pt") as handle:
        for name, row_shape in expected.items():
            if name not in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
                raise ValueError(f"no tensor {name!r}")
            tensor = handle.get_slice(name)
            shape = tuple(tensor.get_shape())
            if shape != (count, *row_shape):
                raise ValueError(
                    f"{name} has shape {shape}, expected {(count, *row_shape)} from index.json"
                )
            dtype = tensor.get_dtype()
            if name in ("encoder_attention_mask", TEXT_LENGTHS):
                allowed = _MASK_DTYPES - {"BOOL"} if name == TEXT_LENGTHS else _MASK_DTYPES
            else:
                text = name in ("encoder_hidden_states", "pooled_projections")
                wanted = declared["text" if text else "latent"]
                allowed = frozenset({wanted}) if wanted else _FLOAT_DTYPES
            if dtype not in allowed:
                raise ValueError(f"{name} has dtype {dtype}, expected one of {sorted(allowed)}")
        # Optional (written since precompute records image sizes): (n, 2) integer sizes.
        for name in ("original_size", "crop_size"):
            if name in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != (count, 2):
                    raise ValueError(f"{name} has shape {shape}, expected {(count, 2)}")
        metadata = handle.metadata() or {}
    captions = json.loads(metadata.get("captions", "null")) or [""] * count
    files = json.loads(metadata.get("files", "null")) or [None] * count
    if len(captions) != count or len(files) != count:
        raise ValueError(f"metadata lists != {count} captions/files")
    return captions, files


def _check_packed_text(
    path: str, count: int, text_shape: tuple[int, ...], dtype: str | None
) -> torch.Tensor:
    """The (count + 1,) row offsets of a shard's packed text, after checking its lengths (1..L)
    and the packed states' shape (sum of lengths, D) and dtype."""
    length, width = text_shape
    with safe_open(path, framework="pt") as handle:
        lengths = handle.get_tensor(TEXT_LENGTHS).long()
        if PACKED_STATES not in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
            raise ValueError(f"no tensor {PACKED_STATES!r}")
        states = handle.get_slice(PACKED_STATES)
        shape, stored = tuple(states.get_shape()), states.get_dtype()
    if count and (int(lengths.min()) < 1 or int(lengths.max()) > length):
        raise ValueError(f"{TEXT_LENGTHS} outside 1..{length} (index.json text.shape)")
    total = int(lengths.sum())
    if shape != (total, width):
        raise ValueError(f"{PACKED_STATES} has shape {shape}, expected {(total, width)}")
    if dtype is not None and stored != dtype:
        raise ValueError(f"{PACKED_STATES} has dtype {stored}, expected {dtype}")
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _non_finite(item: dict[str, Any]) -> str | None:
    """Why an item cannot be trained on (NaN/Inf in a stored tensor), or None."""
    for name in ("latents", "encoder_hidden_states", "pooled_projections"):
        if name in item and not torch.isfinite(item[name]).all():
            return f"non-finite values (NaN/Inf) in {name}"
    return None


def read_index(root: str) -> dict[str, Any]:
    """``root/index.json`` of a shard folder, checked for format, version and required keys, in
    the version 2 form: ``bucket_table``, ``buckets`` and every shard's ``bucket`` are filled in
    for an index without buckets (one bucket of ``latent.shape``)."""
    path = os.path.join(root, "index.json")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.shard_dir {root!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.shard_dir {root!r} has no index.json (make it with `e2ed2 precompute`; an "
            "interrupted run leaves no index)"
        )
    confined = ConfinedRoot(root, "data.shard_dir")
    with open(confined.resolve("index.json")) as f:
        index = json.load(f)
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r} is not {INDEX_FORMAT!r}")
    if index.get("version") not in READABLE_INDEX_VERSIONS:
        raise ValueError(
            f"{path}: version {index.get('version')!r} is not supported (expected one of "
            f"{list(READABLE_INDEX_VERSIONS)})"
        )
    for key in ("num_samples", "shards", "latent", "text"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r}")
    # A shard file named by the index is read: it must lie inside the folder (data/paths.py).
    for number, shard in enumerate(index["shards"]):
        file = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(file, str):
            raise ValueError(f"{path}: shards[{number}] has no file name")
        try:
            confined.resolve(file)
        except PathOutsideRoot as error:
            raise ValueError(f"{path}: shards[{number}].file {error}") from None
    kinds = ("distribution", "sample")
    if index["latent"].get("kind") not in kinds:
        raise ValueError(f"{path}: latent.kind={index['latent'].get('kind')!r} not in {kinds}")
    return _with_buckets(index, path)


def check_bucket_table(config: DataConfig, index: dict[str, Any]) -> None:
    """``data.buckets`` must name the table the shard folder was precomputed with."""
    table = index.get("bucket_table", "none")
    if config.buckets != table:
        raise ValueError(
            f"data.buckets={config.buckets!r}, but data.shard_dir={config.shard_dir!r} was "
            f"precomputed with buckets {table!r} ({len(index['buckets'])} in use); set "
            f"data.buckets={table!r}"
        )
    if table == "none" and len(index["buckets"]) > 1:
        raise ValueError(
            f"data.shard_dir={config.shard_dir!r} holds {len(index['buckets'])} latent shapes "
            "but bucket table 'none'; precompute it again"
        )


def _with_buckets(index: dict[str, Any], path: str) -> dict[str, Any]:
    """``index`` with its buckets checked, or (no buckets) one bucket of ``latent.shape``."""
    if "buckets" not in index:
        shape = index["latent"].get("shape")
        if shape is None:
            raise ValueError(f"{path}: neither latent.shape nor buckets")
        # Written before buckets: the stored crop is the square of index "resolution" (if
        # recorded) else the latent times the SD/PixArt VAE's 8.
        side = index.get("resolution")
        height, width = (side, side) if side else (8 * shape[-2], 8 * shape[-1])
        total = index["num_samples"]
        index = {
            **index,
            "bucket_table": "none",
            "buckets": [
                {"height": height, "width": width, "latent_shape": shape, "num_samples": total}
            ],
            "shards": [{**shard, "bucket": 0} for shard in index["shards"]],
        }
    buckets = index["buckets"]
    if not isinstance(buckets, list) or not buckets:
        raise ValueError(f"{path}: buckets must be a non-empty list, got {buckets!r}")
    counts = [0] * len(buckets)
    for shard in index["shards"]:
        bucket = shard.get("bucket")
        if (
            isinstance(bucket, bool)
            or not isinstance(bucket, int)
            or not 0 <= bucket < len(buckets)
        ):
            raise ValueError(
                f"{path}: shard {shard.get('file')!r} has bucket {bucket!r}, expected an index "
                f"into the {len(buckets)} buckets"
            )
        counts[bucket] += int(shard["num_samples"])
    for number, (bucket, count) in enumerate(zip(buckets, counts, strict=True)):
        if not all(key in bucket for key in ("height", "width", "latent_shape")):
            raise ValueError(f"{path}: bucket {number} needs height, width and latent_shape")
        if int(bucket.get("num_samples", count)) != count:
            raise ValueError(
                f"{path}: bucket {number} lists num_samples={bucket['num_samples']}, but its "
                f"shards hold {count}"
            )
    index.setdefault("bucket_table", "none")
    return index


def _expected_tensors(
    kind: str,
    latent_shape: tuple[int, ...],
    text_shape: tuple[int, ...],
    *,
    pooled_dim: int | None = None,
    masked: bool = True,
    packed: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the tensors a shard must hold (SD3's: pooled projections, no mask;
    packed text: its row lengths here, the packed states checked by _check_packed_text)."""
    latents = (
        {"latent_mean": latent_shape, "latent_std": latent_shape}
        if kind == "distribution"
        else {"latents": latent_shape}
    )
    expected = dict(latents)
    if packed:
        expected[TEXT_LENGTHS] = ()
    else:
        expected["encoder_hidden_states"] = text_shape
        if masked:
            expected["encoder_attention_mask"] = text_shape[:1]
    if pooled_dim is not None:
        expected["pooled_projections"] = (pooled_dim,)
    return expected


# --------------------------------------------------------------------------------------------
# Writing (``e2ed2 precompute``)


class ShardWriter:
    """Buffers encoded rows per bucket and writes ``shard-NNNNN.safetensors`` files of at most
    ``shard_size`` rows, each holding one bucket's rows (one latent shape per file).

    At most ``shard_size`` rows wait in memory across all buckets (with 33 buckets, one full
    buffer per bucket would hold 33 shards of T5 states): when that many are waiting, the bucket
    with the most rows is written, so rare buckets get smaller shards. ``shards`` lists the written files with their ``bucket``; ``shapes[bucket]`` holds the per-row
    shape of every tensor of that bucket. :meth:`close` writes each bucket's remainder.
    """

    def __init__(
        self,
        out: Path,
        shard_size: int,
        dtype: torch.dtype,
        *,
        pack_text: bool = False,
        file_name: Callable[[int], str] | None = None,
    ) -> None:
        self.out, self.shard_size, self.dtype = out, shard_size, dtype
        #: The n-th written file's name (default ``shard-<n>.safetensors``; precompute names
        #: its files by chunk, data/precompute_parallel.py).
        self.file_name = file_name or (lambda number: f"shard-{number:05d}.safetensors")
        #: Store each row's text states trimmed to its mask's tokens (``text.packed``).
        self.pack_text = pack_text
        self.buffers: dict[int, _BucketBuffer] = {}
        self.shards: list[dict[str, Any]] = []
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}
        self.num_samples = 0

    def add(
        self,
        tensors: dict[str, torch.Tensor],
        captions: list[str],
        files: list[str],
        bucket: int = 0,
    ) -> None:
        """Rows of one bucket (every tensor's first dimension = ``len(captions)``)."""
        buffer = self.buffers.setdefault(bucket, _BucketBuffer())
        shapes = self.shapes.setdefault(bucket, {})
        for name, value in tensors.items():
            value = value.detach().to("cpu")
            if value.is_floating_point():
                value = value.to(self.dtype)
            buffer.tensors.setdefault(name, []).append(value)
            shapes[name] = tuple(value.shape[1:])
        buffer.captions.extend(captions)
        buffer.files.extend(files)
        while sum(len(b.captions) for b in self.buffers.values()) >= self.shard_size:
            fullest = max(self.buffers, key=lambda number: len(self.buffers[number].captions))
            self._write(fullest, min(self.shard_size, len(self.buffers[fullest].captions)))

    def close(self) -> None:
        for bucket in sorted(self.buffers):
            if self.buffers[bucket].captions:
                self._write(bucket, len(self.buffers[bucket].captions))

    def bucket_counts(self) -> dict[int, int]:
        """Samples written per bucket."""
        counts: dict[int, int] = {}
        for shard in self.shards:
            counts[shard["bucket"]] = counts.get(shard["bucket"], 0) + shard["num_samples"]
        return counts

    def _write(self, bucket: int, count: int) -> None:
        buffer = self.buffers[bucket]
        tensors, rest = {}, {}
        for name, parts in buffer.tensors.items():
            joined = torch.cat(parts)
            tensors[name] = joined[:count].contiguous()
            rest[name] = [joined[count:]] if joined.shape[0] > count else []
        metadata = {
            "captions": json.dumps(buffer.captions[:count]),
            "files": json.dumps(buffer.files[:count]),
        }
        if self.pack_text:
            tensors = _pack_text(tensors)
        name = self.file_name(len(self.shards))
        write_atomic(self.out / name, _sorted_metadata(save(tensors, metadata=metadata)))
        self.shards.append({"file": name, "num_samples": count, "bucket": bucket})
        self.num_samples += count
        buffer.tensors = rest
        buffer.captions, buffer.files = buffer.captions[count:], buffer.files[count:]


def _pack_text(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Padded states (n, L, D) and their mask (n, L) -> the rows' real tokens concatenated
    (sum of lengths, D) and the lengths (n,) int32. The padding T5 writes is never attended to
    (the mask hides it), so it is dropped; the reader pads with zeros. Needs right padding (the
    mask of each row: ones, then zeros), which every tokenizer precompute uses writes."""
    states = tensors.pop("encoder_hidden_states")
    mask = tensors.pop("encoder_attention_mask").bool()
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1])[None] < lengths[:, None]
    if not torch.equal(mask, prefix):
        raise ValueError("text states can only be packed with right padding (mask 1...1 0...0)")
    return {
        **tensors,
        PACKED_STATES: states[mask].contiguous(),
        TEXT_LENGTHS: lengths.to(torch.int32),
    }


class _BucketBuffer:
    """One bucket's rows not yet written: tensors by name, captions, source files."""

    def __init__(self) -> None:
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.captions: list[str] = []
        self.files: list[str] = []


def _sorted_metadata(payload: bytes) -> bytes:
    """A safetensors file's bytes with its header's ``__metadata__`` keys in sorted order.

    safetensors keeps the metadata in a Rust hash map, whose order changes from process to
    process: the same tensors and captions would give files of different bytes, and a folder
    written by several processes (or resumed) would not hash equal to one written at once. The
    header is JSON (8-byte little-endian length, then the header, padded with spaces); the
    same keys in sorted order have the same length, so the tensor data does not move."""
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    metadata = header.get("__metadata__")
    if not metadata:
        return payload
    header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # another JSON spelling than safetensors': leave the file as it is
        return payload
    return payload[:8] + text.ljust(length, b" ") + payload[8 + length :]
