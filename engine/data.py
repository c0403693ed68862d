"""Training data: the embedded digits default, precomputed latent shards, and resumable batching.

Every dataset item is a dict that torch's default collate stacks::

    "latents"                (C, h, w) float32   what the trajectory starts from / is scored against
    "encoder_hidden_states"  (L, D) float32      text-encoder output
    "encoder_attention_mask" (L,) long           1 = token, 0 = padding
    "index"                  int                 position of the sample in the dataset (global,
                                                 the same on every rank)
    "label"                  int                 digits only: the digit 0..9

Batching is owned by :class:`ResumableBatchSampler`: one permutation per epoch, global batch ``g``
is ``perm[g*B*W : (g+1)*B*W]`` and rank ``r`` takes the contiguous chunk ``[r*B : (r+1)*B]`` of
it. So the ranks' micro-batches concatenated in rank order are exactly the batch one process with
``batch_per_rank = B*W`` sees at the same step, and the position (epoch, global batch) is all the
state a resumed run needs, independent of ``num_workers``, prefetching and, for the same global
batch size, of the world size.

Where the data needs randomness (the split, captions, latent posterior noise, permutations) it is
drawn from a ``torch.Generator`` seeded by :func:`derive_seed` from ``(config.seed, purpose,
integers...)``, never from the global RNG, so items do not depend on which worker loads them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import operator
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DIGIT_WORDS",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "DataConfig",
    "DigitsDataset",
    "LatentShardDataset",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "SampleKey",
    "build_dataloader",
    "build_dataset",
    "derive_seed",
    "digits_text_encoder",
    "encode_text",
]

logger = logging.getLogger(__name__)

DataSource = Literal["digits", "shards"]
Split = Literal["train", "holdout"]

_SOURCES = ("digits", "shards")
_SPLITS = ("train", "holdout")

#: ``index.json`` of a shard folder: ``format`` must equal INDEX_FORMAT, ``version`` INDEX_VERSION.
INDEX_FORMAT = "e2ed2-latent-shards"
INDEX_VERSION = 1

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A few phrasings so the text encoder sees more than ten strings; each sample keeps one phrasing
# (drawn once from the seed), so captions are fixed per sample.
_CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten {word}",
    "the digit {word}, written by hand",
)
# The digits text encoder: a T5 encoder (gated-GELU, as T5 v1.1 / ByT5) small enough to build in
# milliseconds. d_kv = text_dim // heads.
_DIGITS_TEXT_LAYERS = 2
_DIGITS_TEXT_HEADS = 4
# load_digits pixel values are integers 0..16.
_DIGITS_MAX_VALUE = 16.0


@dataclass(frozen=True)
class DataConfig:
    """Where training samples come from (the ``[data]`` table of a run config)."""

    # "digits": scikit-learn's 8x8 digits, upscaled, one channel, pixel space (no autoencoder).
    # "shards": latents + text embeddings precomputed by ``e2ed2 precompute`` into shard_dir.
    source: DataSource = "digits"
    shard_dir: str | None = None
    # Digits: side of the upscaled images in pixels (>= 8; the 8x8 originals are only upscaled).
    resolution: int = 16
    # Digits: text length in ByT5 tokens (bytes + EOS); captions are padded / truncated to it.
    caption_max_tokens: int = 32
    # Digits: hidden size D of the tiny text encoder (a multiple of its 4 heads).
    text_dim: int = 64
    # Digits: fraction of each class held out of training (for evaluation); 0 = no holdout.
    holdout_fraction: float = 0.2
    seed: int = 0
    num_workers: int = 0
    # Shards: how many shard files one process keeps open (memory-mapped) at a time.
    shard_cache_size: int = 4
    # Shards: the largest tolerated share (0..1) of bad samples (unreadable shard, wrong shape or
    # dtype, NaN/Inf values), as bad samples drawn / max(samples drawn, dataset size). Bad samples
    # are skipped, counted and logged; past this share the run stops with an error.
    max_bad_sample_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {list(_SOURCES)}")
        if self.source == "shards" and not self.shard_dir:
            raise ValueError(
                "data.shard_dir is required for data.source='shards' (a folder made by "
                "`e2ed2 precompute`, with index.json)"
            )
        if self.shard_dir is not None and not isinstance(self.shard_dir, str):
            raise ValueError(f"data.shard_dir must be a path string, got {self.shard_dir!r}")
        _check_int("data.resolution", self.resolution, minimum=8)
        _check_int("data.caption_max_tokens", self.caption_max_tokens, minimum=1)
        _check_int("data.text_dim", self.text_dim, minimum=_DIGITS_TEXT_HEADS)
        if self.text_dim % _DIGITS_TEXT_HEADS:
            raise ValueError(
                f"data.text_dim must be a multiple of {_DIGITS_TEXT_HEADS} (the digits text "
                f"encoder's heads), got {self.text_dim}"
            )
        if (
            isinstance(self.holdout_fraction, bool)
            or not isinstance(self.holdout_fraction, int | float)
            or not 0.0 <= self.holdout_fraction < 1.0
        ):
            raise ValueError(
                f"data.holdout_fraction must be a number in [0, 1), got {self.holdout_fraction!r}"
            )
        _check_int("data.seed", self.seed, minimum=0)
        if self.seed >= 2**63:
            raise ValueError(f"data.seed must be < 2**63, got {self.seed}")
        _check_int("data.num_workers", self.num_workers, minimum=0)
        _check_int("data.shard_cache_size", self.shard_cache_size, minimum=1)
        if (
            isinstance(self.max_bad_sample_fraction, bool)
            or not isinstance(self.max_bad_sample_fraction, int | float)
            or not 0.0 <= self.max_bad_sample_fraction <= 1.0
        ):
            raise ValueError(
                "data.max_bad_sample_fraction must be a number in [0, 1], got "
                f"{self.max_bad_sample_fraction!r}"
            )


def _check_int(key: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def derive_seed(seed: int, purpose: str, *values: int) -> int:
    """A 64-bit seed for one purpose, from the run seed and integers (epoch, sample index, ...).

    A hash rather than ``seed + epoch`` so that streams never collide across seeds, epochs and
    purposes (``seed=0, epoch=1`` and ``seed=1, epoch=0`` give unrelated permutations).
    """
    payload = struct.pack(f"<{1 + len(values)}q", seed, *values) + purpose.encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def _generator(seed: int, purpose: str, *values: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *values))


class SampleKey(NamedTuple):
    """What the batch sampler hands the datasets: a sample and the epoch it is drawn in.

    The epoch reaches the dataset through the key (not through a ``set_epoch`` call) because with
    ``num_workers > 0`` the dataset lives in worker processes that a call on the main copy does not
    reach. Datasets also accept a plain ``int`` (epoch 0).
    """

    index: int
    epoch: int


def _unpack_key(key: int | SampleKey | tuple[int, int], length: int) -> tuple[int, int]:
    if isinstance(key, tuple):
        index, epoch = operator.index(key[0]), operator.index(key[1])
    else:
        index, epoch = operator.index(key), 0
    if not 0 <= index < length:
        raise IndexError(f"sample index {index} out of range for {length} samples")
    return index, epoch


# --------------------------------------------------------------------------------------------
# Text encoding


def digits_text_encoder(text_dim: int, seed: int) -> tuple[Any, torch.nn.Module]:
    """The embedded default's frozen text encoder: ``(ByT5Tokenizer, T5EncoderModel)``.

    ByT5 tokenizes UTF-8 bytes, so it needs no vocabulary files; the encoder is built from a
    ``T5Config`` with random weights drawn from ``seed`` (inside ``fork_rng``, leaving the global
    RNG untouched), so two constructions give identical embeddings.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=text_dim,
        d_kv=text_dim // _DIGITS_TEXT_HEADS,
        d_ff=2 * text_dim,
        num_layers=_DIGITS_TEXT_LAYERS,
        num_heads=_DIGITS_TEXT_HEADS,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "digits-text-encoder"))
        encoder = T5EncoderModel(config)
    encoder.eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_text(
    tokenizer: Any,
    encoder: torch.nn.Module,
    captions: Sequence[str],
    max_tokens: int,
    *,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ``(hidden states (N, max_tokens, D), attention mask (N, max_tokens) long)``.

    PixArt's convention: pad to ``max_tokens``, truncate longer captions (the tokenizer appends
    EOS), and keep the encoder output at padded positions (the mask tells the denoiser to ignore
    them). The states come back in the encoder's dtype on ``device`` (default: the encoder's).
    """
    if device is None:
        device = next(encoder.parameters()).device
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_tokens,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    states = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return states, mask.long()


# --------------------------------------------------------------------------------------------
# Embedded default: scikit-learn digits


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits, upscaled, captioned and text-encoded.

    Images: ``load_digits`` values 0..16 scaled to [-1, 1], bilinearly upscaled to
    ``config.resolution`` (one channel, pixel space: the trainer pairs it with an identity
    autoencoder). Captions: "a handwritten digit seven" and two other phrasings, one per sample.
    Text embeddings of the few distinct captions are computed once here (no grad) and shared.

    Split: ``holdout_fraction`` of every class (rounded) is held out, chosen by a permutation
    seeded by ``config.seed``; ``train`` is the rest. Both are sorted by source row.
    """

    def __init__(self, config: DataConfig, split: Split = "train") -> None:
        from sklearn.datasets import load_digits

        if split not in _SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(_SPLITS)}")
        self.config = config
        self.split = split
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32)  # (N, 8, 8), 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        num_source = images.shape[0]

        rows = _stratified_split(labels, config.holdout_fraction, config.seed)[split]
        if rows.numel() == 0:
            raise ValueError(
                f"the digits {split!r} split is empty (data.holdout_fraction="
                f"{config.holdout_fraction}); use a fraction that leaves samples in it"
            )
        #: Row of each sample in ``load_digits()`` (for tracing a sample back to its source).
        self.source_indices: torch.Tensor = rows
        #: The digit of each sample, (N,) long.
        self.labels: torch.Tensor = labels[rows]

        pixels = images[rows].unsqueeze(1) * (2.0 / _DIGITS_MAX_VALUE) - 1.0  # (N, 1, 8, 8)
        size = config.resolution
        if size != pixels.shape[-1]:
            # Bilinear interpolation is a convex combination, so [-1, 1] is kept; the clamp only
            # absorbs rounding.
            pixels = F.interpolate(
                pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            ).clamp_(-1.0, 1.0)
        #: All images, (N, 1, resolution, resolution) float32 in [-1, 1].
        self.images: torch.Tensor = pixels.contiguous()

        # One phrasing per source row, drawn once for the whole set so a sample's caption does
        # not depend on the split it lands in.
        phrasing = torch.randint(
            len(_CAPTION_TEMPLATES),
            (num_source,),
            generator=_generator(config.seed, "digits-captions"),
        )[rows]
        caption_ids = phrasing * len(DIGIT_WORDS) + self.labels
        #: Caption of each sample (for sample grids and logs).
        self.captions: list[str] = [_digit_caption(int(c)) for c in caption_ids]
        self._caption_ids = caption_ids

        self.tokenizer, self.text_encoder = digits_text_encoder(config.text_dim, config.seed)
        all_captions = [
            _digit_caption(i) for i in range(len(_CAPTION_TEMPLATES) * len(DIGIT_WORDS))
        ]
        states, mask = encode_text(
            self.tokenizer, self.text_encoder, all_captions, config.caption_max_tokens
        )
        # (num distinct captions, L, D) float32 and (num distinct captions, L) long.
        self._text_states = states.float().contiguous()
        self._text_mask = mask.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of ``item["latents"]``: here the pixels themselves."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of ``item["encoder_hidden_states"]``."""
        return tuple(self._text_states.shape[1:])  # type: ignore[return-value]

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Any captions through this dataset's text encoder: ((N, L, D) float32, (N, L) long)."""
        states, mask = encode_text(
            self.tokenizer, self.text_encoder, captions, self.config.caption_max_tokens
        )
        return states.float(), mask

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, _ = _unpack_key(key, len(self))
        caption_id = int(self._caption_ids[index])
        return {
            "latents": self.images[index],
            "encoder_hidden_states": self._text_states[caption_id],
            "encoder_attention_mask": self._text_mask[caption_id],
            "index": index,
            "label": int(self.labels[index]),
        }


def _digit_caption(caption_id: int) -> str:
    phrasing, digit = divmod(caption_id, len(DIGIT_WORDS))
    return _CAPTION_TEMPLATES[phrasing].format(word=DIGIT_WORDS[digit])


def _stratified_split(
    labels: torch.Tensor, holdout_fraction: float, seed: int
) -> dict[str, torch.Tensor]:
    """Source rows of each split: ``round(fraction * class size)`` of every class held out."""
    holdout: list[torch.Tensor] = []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        order = torch.randperm(rows.numel(), generator=_generator(seed, "digits-split", label))
        holdout.append(rows[order[: round(holdout_fraction * rows.numel())]])
    held = torch.zeros(labels.numel(), dtype=torch.bool)
    held[torch.cat(holdout)] = True
    return {
        "train": torch.nonzero(~held).flatten(),
        "holdout": torch.nonzero(held).flatten(),
    }


# --------------------------------------------------------------------------------------------
# Precomputed latent shards


class LatentShardDataset(Dataset):
    """Latents and text embeddings from a folder written by ``e2ed2 precompute``.

    Folder layout (``index.json`` is written last, so its presence means the folder is complete)::

        index.json                  {"format": "e2ed2-latent-shards", "version": 1,
                                     "num_samples": N,
                                     "shards": [{"file": "shard-00000.safetensors",
                                                 "num_samples": n}, ...],
                                     "latent": {"kind": "distribution" | "sample",
                                                "shape": [C, h, w], "dtype": "float16"},
                                     "text": {"shape": [L, D], "dtype": "float16"},
                                     "vae": {"scaling_factor": 0.18215, "shift_factor": null,
                                             ...},
                                     "skipped": [{"path": ..., "reason": ...}], ...}
        shard-00000.safetensors     latent_mean, latent_std (n, C, h, w)   ("distribution")
                                    or latents (n, C, h, w)                 ("sample")
                                    encoder_hidden_states (n, L, D)
                                    encoder_attention_mask (n, L) bool / uint8 / int
                                    metadata: "captions" (JSON list of n strings),
                                              "files" (JSON list of n source paths, optional)

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
        self._latent_shape = tuple(int(s) for s in latent["shape"])
        self._text_shape = tuple(int(s) for s in self.index["text"]["shape"])
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

        # Read every shard's header once (cheap: no tensor data) to check it against the index
        # and collect the captions. A bad shard (missing, unreadable, wrong shape or dtype) does
        # not stop training: its rows are bad samples, skipped and counted like any other.
        expected = _expected_tensors(self.latent_kind, self._latent_shape, self._text_shape)
        declared = {
            "latent": _SAFETENSORS_DTYPES.get(str(latent.get("dtype"))),
            "text": _SAFETENSORS_DTYPES.get(str(self.index["text"].get("dtype"))),
        }
        self.captions: list[str] = []
        self.files: list[str | None] = []
        #: Unusable shards: shard number -> why (every row of one is a bad sample).
        self.bad_shards: dict[int, str] = {}
        for number, (path, count) in enumerate(zip(self.shard_files, counts, strict=True)):
            try:
                captions, files = _check_shard(path, count, expected, declared)
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
        """(C, h, w) of ``item["latents"]``."""
        return self._latent_shape  # type: ignore[return-value]

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of ``item["encoder_hidden_states"]``."""
        return self._text_shape  # type: ignore[return-value]

    def _shard(self, shard: int) -> Any:
        from safetensors import safe_open

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
        """The item of ``key``; a bad sample is replaced by the next good one (in index order).

        ``bad_count`` (0 or 1) says whether the drawn sample was bad and ``bad_sample`` where it
        lives and why (empty if good), so the trainer can count and log it; the replacement keeps
        every batch full, so all ranks run the same collective operations.
        """
        index, epoch = _unpack_key(key, len(self))
        drawn_problem = None
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
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
            raise ValueError(f"{self.root}: no usable sample left (last: {drawn_problem})")
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
                mean.shape, generator=_generator(self.config.seed, "latent-eps", epoch, index)
            )
            z = mean + std * eps
        else:
            z = read("latents").float()
        latents = self.scaling_factor * (z - self.shift_factor)
        return {
            "latents": latents,
            "encoder_hidden_states": read("encoder_hidden_states").float(),
            "encoder_attention_mask": read("encoder_attention_mask").long(),
            "index": index,
        }


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
    from safetensors import safe_open

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
            if name == "encoder_attention_mask":
                allowed = _MASK_DTYPES
            else:
                wanted = declared["text" if name == "encoder_hidden_states" else "latent"]
                allowed = frozenset({wanted}) if wanted else _FLOAT_DTYPES
            if dtype not in allowed:
                raise ValueError(f"{name} has dtype {dtype}, expected one of {sorted(allowed)}")
        metadata = handle.metadata() or {}
    captions = json.loads(metadata.get("captions", "null")) or [""] * count
    files = json.loads(metadata.get("files", "null")) or [None] * count
    if len(captions) != count or len(files) != count:
        raise ValueError(f"metadata lists != {count} captions/files")
    return captions, files


def _non_finite(item: dict[str, Any]) -> str | None:
    """Why an item cannot be trained on (NaN/Inf in a stored tensor), or None."""
    for name in ("latents", "encoder_hidden_states"):
        if not torch.isfinite(item[name]).all():
            return f"non-finite values (NaN/Inf) in {name}"
    return None


def read_index(root: str) -> dict[str, Any]:
    """``root/index.json`` of a shard folder, checked for format, version and required keys."""
    path = os.path.join(root, "index.json")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.shard_dir {root!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.shard_dir {root!r} has no index.json (make it with `e2ed2 precompute`; an "
            "interrupted run leaves no index)"
        )
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r} is not {INDEX_FORMAT!r}")
    if index.get("version") != INDEX_VERSION:
        raise ValueError(
            f"{path}: version {index.get('version')!r} is not supported (expected {INDEX_VERSION})"
        )
    for key in ("num_samples", "shards", "latent", "text"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r}")
    kinds = ("distribution", "sample")
    if index["latent"].get("kind") not in kinds:
        raise ValueError(f"{path}: latent.kind={index['latent'].get('kind')!r} not in {kinds}")
    return index


def _expected_tensors(
    kind: str, latent_shape: tuple[int, ...], text_shape: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the tensors a shard must hold."""
    latents = (
        {"latent_mean": latent_shape, "latent_std": latent_shape}
        if kind == "distribution"
        else {"latents": latent_shape}
    )
    return {
        **latents,
        "encoder_hidden_states": text_shape,
        "encoder_attention_mask": text_shape[:1],
    }


# --------------------------------------------------------------------------------------------
# Distributed, deterministic, resumable batching


class ResumableBatchSampler:
    """Per-rank micro-batches of sample indices, forever: deterministic per seed and resumable.

    Epoch ``e`` is a permutation of ``range(num_samples)`` (``torch.randperm`` with a generator
    seeded by ``(seed, e)``; the identity if not ``shuffle``), cut into
    ``batches_per_epoch = num_samples // (batch_per_rank * world_size)`` global batches; the
    incomplete tail is dropped (a different tail every epoch when shuffling). Global batch ``g``
    is ``perm[g*B*W : (g+1)*B*W]`` and rank ``r`` yields its chunk ``[r*B : (r+1)*B]``.

    ``state_dict()`` is the position of the next batch: ``{"epoch", "batch_in_epoch"}``
    (``batch_in_epoch`` counts global batches, so it means the same on every rank).
    :class:`ResumableDataLoader` keeps it equal to what the consumer has received, not what
    workers have prefetched. With ``yield_keys`` the batches hold :class:`SampleKey` s (index and
    epoch) instead of ints, for datasets whose items depend on the epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        *,
        yield_keys: bool = False,
    ) -> None:
        _check_int("batch_per_rank", batch_per_rank, minimum=1)
        _check_int("world_size", world_size, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("num_samples", num_samples, minimum=1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        global_batch = batch_per_rank * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"num_samples={num_samples} is smaller than one global batch "
                f"(batch_per_rank={batch_per_rank} x world_size={world_size} = {global_batch})"
            )
        self.num_samples = num_samples
        self.batch_per_rank = batch_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.yield_keys = yield_keys
        self.batches_per_epoch = num_samples // global_batch
        self._position = 0  # global batches delivered since epoch 0, batch 0
        self._loads = 0  # bumped by load_state_dict; running iterators then stop

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``, (num_samples,) long (the same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=_generator(self.seed, "perm", epoch))

    def __iter__(self) -> Iterator[list[int] | list[SampleKey]]:
        loads = self._loads
        position = self._position
        epoch, perm = -1, torch.empty(0, dtype=torch.long)
        begin = self.rank * self.batch_per_rank
        while True:
            if self._loads != loads:
                raise RuntimeError(
                    "ResumableBatchSampler.load_state_dict was called while iterating; "
                    "start a new iterator"
                )
            batch_epoch, batch = divmod(position, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, perm = batch_epoch, self.permutation(batch_epoch)
            start = batch * self.global_batch + begin
            indices = perm[start : start + self.batch_per_rank].tolist()
            position += 1
            self._position = position
            if self.yield_keys:
                yield [SampleKey(i, epoch) for i in indices]
            else:
                yield indices

    def state_dict(self) -> dict[str, int]:
        epoch, batch = divmod(self._position, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state``'s batch; iterators started before this call stop."""
        missing = {"epoch", "batch_in_epoch"} - set(state)
        if missing:
            raise KeyError(f"sampler state is missing {sorted(missing)}")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(
                f"sampler state {dict(state)} is out of range: epoch >= 0 and "
                f"batch_in_epoch in 0..{self.batches_per_epoch - 1}"
            )
        self._position = epoch * self.batches_per_epoch + batch
        self._loads += 1

    def _mark_delivered(self, position: int) -> None:
        self._position = position


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableBatchSampler` whose state follows consumption.

    Workers prefetch index batches ahead of the consumer, which moves the sampler's position
    ahead; after every batch this loader hands out, it resets the position to "batches handed out
    since this iterator started", so ``sampler.state_dict()`` is the same for any num_workers.
    """

    batch_sampler: ResumableBatchSampler

    def __init__(self, dataset: Dataset, batch_sampler: ResumableBatchSampler, **kwargs: Any):
        if not isinstance(batch_sampler, ResumableBatchSampler):
            raise TypeError("ResumableDataLoader needs a ResumableBatchSampler")
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.batch_sampler
        start = sampler._position
        for delivered, batch in enumerate(super().__iter__(), start=1):
            sampler._mark_delivered(start + delivered)
            yield batch


def build_dataset(config: DataConfig, split: Split = "train") -> Dataset:
    """The dataset ``config`` names: :class:`DigitsDataset` or :class:`LatentShardDataset`."""
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(_SPLITS)}")
    if config.source == "digits":
        return DigitsDataset(config, split)
    if split != "train":
        raise ValueError(
            f"data.source='shards' has only a 'train' split (got split={split!r}); "
            "precompute a second folder for evaluation"
        )
    return LatentShardDataset(config)


def build_dataloader(
    config: DataConfig,
    batch_per_rank: int,
    rank: int = 0,
    world_size: int = 1,
    split: Split = "train",
    *,
    shuffle: bool = True,
    pin_memory: bool = False,
) -> tuple[ResumableDataLoader, ResumableBatchSampler]:
    """An endless loader of this rank's micro-batches and its sampler (for state_dict/resume).

    Iterate it with ``next(iterator)`` (it never ends); call ``sampler.load_state_dict`` before
    creating the iterator to resume.
    """
    dataset = build_dataset(config, split)
    sampler = ResumableBatchSampler(
        len(dataset),
        batch_per_rank,
        rank,
        world_size,
        seed=config.seed,
        shuffle=shuffle,
        yield_keys=True,
    )
    loader = ResumableDataLoader(
        dataset,
        sampler,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
    )
    return loader, sampler
