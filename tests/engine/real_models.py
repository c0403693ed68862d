"""Tiny models with the *structure* of the real checkpoints, saved as diffusers folders.

What the presets point at (``configs/pixart_alpha_{512,1024}.toml``) is a PixArt pipeline folder
as published (PixArt-LCM-XL-2-1024-MS; a 512 px PixArt-α). Every structural flag of those folders
is kept here, only depth and widths shrink:

* ``transformer/``: ``PixArtTransformer2DModel`` with ``norm_type="ada_norm_single"``, learned
  sigma (``out_channels=8`` for 4 latent channels), ``caption_channels`` = the T5 width,
  ``sample_size`` 128 (1024-MS: diffusers then turns on the resolution / aspect-ratio
  embeddings by itself, as for the real config, which does not set
  ``use_additional_conditions``) or 64 (512: none), 2 layers.
* ``vae/``: an SD-style ``AutoencoderKL`` (4 blocks: 8x downsampling, 4 latent channels,
  ``scaling_factor`` 0.18215).
* ``text_encoder/``: a T5 v1.1-style ``T5EncoderModel`` (gated-GELU) saved in *several*
  safetensors shards with an index, as T5-XXL is.
* ``tokenizer/``: ``spiece.model`` (a sentencepiece unigram model trained offline on a few
  sentences) with ``tokenizer_config.json`` / ``special_tokens_map.json`` and no
  ``tokenizer.json``, as PixArt's folder: loading it makes transformers convert the
  sentencepiece model (needs ``sentencepiece`` + ``protobuf``).
* ``scheduler/``: PixArt-LCM's ``LCMScheduler`` config; ``model_index.json`` of a
  ``PixArtAlphaPipeline``.

Builders are pure functions of their arguments (seeded), so a session-scoped fixture can cache
their folders.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch

#: Width of the tiny T5 (PixArt: T5-XXL's 4096) = the transformer's caption_channels.
T5_WIDTH = 24
#: Caption sentences the sentencepiece model is trained on (and tests prompt with).
SENTENCES = (
    "a photo of a cat sitting on a red sofa",
    "a wide panorama of snowy mountains at dusk",
    "a tall portrait of an old man with a hat",
    "an astronaut riding a horse on the moon",
    "a bowl of green apples on a wooden table",
    "a small boat on a calm blue lake",
)
#: PixArt-LCM's scheduler_config.json (its training schedule; epsilon prediction).
LCM_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "clip_sample": False,
    "set_alpha_to_one": True,
}


def save_sentencepiece_tokenizer(folder: Path) -> Path:
    """A T5 tokenizer folder as PixArt ships it: ``spiece.model`` + configs, no tokenizer.json."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # T5's id layout: pad 0, eos 1, unk 2, no bos. A tiny vocabulary: the corpus is 6 sentences.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_writer=model,
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "extra_ids": 0,
                "model_max_length": 120,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    )
    return folder


def tiny_t5_encoder(vocab_size: int, seed: int = 0):
    """A T5 v1.1-style encoder (gated-GELU, untied, no dropout), tiny."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=3,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_sd_vae(seed: int = 0):
    """An SD-style AutoencoderKL: 4 down blocks (8x), 4 latent channels, scaling 0.18215."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_pixart_real(sample_size: int, seed: int = 0):
    """PixArt-α-XL/2's structure (adaLN-single, learned sigma, T5 captions), 2 layers, tiny.

    ``use_additional_conditions`` is left unset, as in the real config.json: diffusers derives
    it from ``sample_size == 128`` (1024-MS) itself.
    """
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        # Hidden 48 = 3 x 16: PixArt-MS splits its size embedding into thirds (1152 = 3 x 384),
        # and the fused kernels need head dims that are multiples of 8.
        num_attention_heads=3,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        dropout=0.0,
        norm_num_groups=32,
        cross_attention_dim=48,
        attention_bias=True,
        sample_size=sample_size,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        upcast_attention=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=T5_WIDTH,
    )
    # diffusers zero-initialises the output projection (and adaLN-single's last layer): a
    # pretrained model is not zero there, and zeros would hide every conditioning path.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def save_pixart_pipeline(folder: Path, sample_size: int) -> Path:
    """A PixArtAlphaPipeline folder with the real checkpoints' structure (see the module doc)."""
    from diffusers import LCMScheduler, PixArtAlphaPipeline
    from transformers import T5Tokenizer

    tokenizer_dir = save_sentencepiece_tokenizer(folder / "tokenizer")
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir)
    encoder = tiny_t5_encoder(len(tokenizer))
    pipeline = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=tiny_sd_vae(),
        transformer=tiny_pixart_real(sample_size),
        scheduler=LCMScheduler(**LCM_SCHEDULER),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    # Re-save what save_pretrained wrote differently from the real folders: T5 in shards, the
    # tokenizer as the bare sentencepiece model (not transformers' converted tokenizer.json).
    shutil.rmtree(folder / "text_encoder")
    encoder.save_pretrained(folder / "text_encoder", max_shard_size="20KB")
    shutil.rmtree(folder / "tokenizer")
    save_sentencepiece_tokenizer(folder / "tokenizer")
    shards = list((folder / "text_encoder").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1, "the tiny T5 must be saved in several shards"
    return folder


def save_image_folder(folder: Path) -> Path:
    """Captioned images of mixed sizes and aspect ratios (landscape, portrait, 3:1, square),
    captions in ``captions.jsonl`` and one sidecar .txt."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(96, 64), (48, 120), (192, 64), (72, 72), (80, 60), (64, 112)]  # (width, height)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, ((width, height), caption) in enumerate(zip(sizes, SENTENCES, strict=True)):
        # A smooth gradient plus noise: something a VAE can encode, not constant pixels.
        ramp = torch.linspace(0, 255, width).expand(height, width)
        noise = torch.randint(0, 64, (height, width, 3), generator=g)
        pixels = ((ramp[..., None] * 0.7 + noise) % 256).to(torch.uint8)
        name = f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"
        Image.fromarray(pixels.numpy()).save(folder / name)
        if i == len(sizes) - 1:
            (folder / name).with_suffix(".txt").write_text(caption)
        else:
            lines.append(json.dumps({"file": name, "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder
