"""Training data: the embedded digits default, precomputed latent shards, and resumable batching.

Every dataset item is a dict of one sample's fields; the loader's collate
(:meth:`~e2ed2.engine.core.batch.Batch.collate`) stacks them into a
:class:`~e2ed2.engine.core.batch.Batch`, the typed record the trainer, the dry run and the
evaluation read by attribute (its fields carry the shapes). Per item::

    "latents"                (C, h, w) float32   what the trajectory starts from / is scored against
    "encoder_hidden_states"  (L, D) float32      text-encoder output
    "encoder_attention_mask" (L,) long           1 = token, 0 = padding (absent for SD3)
    "pooled_projections"     (D_p,) float32      SD3 only: the pooled text embedding
    "index"                  int                 position of the sample in the dataset (global,
                                                 the same on every rank)
    "label"                  int                 digits only: the digit 0..9
    "resolution"             (2,) float32        shards / prompt folders: the source image's
                                                 (height, width)
    "aspect_ratio"           (1,) float32        shards / prompt folders: the stored crop's
                                                 height / width (both PixArt-MS's
                                                 added_cond_kwargs)
    "bad_count"              int                 shards only: 1 if the drawn sample was bad and
                                                 this is its replacement, else 0
    "bad_sample"             str                 shards only: where the bad sample lives and why
                                                 ("" if good)

A key the ``Batch`` has no field for is refused when collating; an absent optional key is None.

Modules: ``digits`` (the embedded default), ``shards`` (the latent-shard format, read and
written), ``text`` (caption encoding), ``batching`` (the resumable distributed sampler and
loader), ``seeding`` (every random draw of the data is seeded by :func:`derive_seed` from
``(config.seed, purpose, integers...)``, never the global RNG), ``precompute`` (images ->
shards) with ``readers`` (its inputs: image folders, imagefolder metadata, ``datasets``,
webdataset tars), ``images`` (decoding as a viewer shows) and ``paths`` (every file read stays
inside the roots the user named), ``precompute_parallel`` (chunks over processes or launcher
ranks, resume), ``prompts`` (prompts for sample grids), ``prompt_file`` / ``prompt_encoder``
(validation prompts), ``prompts_source`` (``data.source = "prompts"``: prompt-only folders),
``null_condition`` / ``null_condition_add`` (the empty prompt of classifier-free guidance),
``gemma_text`` (Sana's Gemma-2 encoding), ``storage`` (atomic writes, storage dtypes).
"""

from .batching import ResumableBatchSampler, ResumableDataLoader, build_dataloader, build_dataset
from .digits import DIGIT_WORDS, DigitsDataset, digit_prompt
from .prompts import batch_conditioning, null_conditioning, sample_conditioning
from .seeding import SampleKey, derive_seed
from .shards import INDEX_FORMAT, INDEX_VERSION, LatentShardDataset, read_index
from .text import digits_text_encoder, encode_text

__all__ = [
    "DIGIT_WORDS",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "DigitsDataset",
    "LatentShardDataset",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "SampleKey",
    "batch_conditioning",
    "build_dataloader",
    "build_dataset",
    "derive_seed",
    "digit_prompt",
    "digits_text_encoder",
    "encode_text",
    "null_conditioning",
    "read_index",
    "sample_conditioning",
]
