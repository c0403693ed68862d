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

``configs/sd3_medium_512.toml`` points at a ``StableDiffusion3Pipeline`` folder
(stable-diffusion-3-medium-diffusers): :func:`save_sd3_pipeline` keeps its structure (MMDiT,
three text encoders, the 16-channel VAE with its shift, the flow matching scheduler).

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


def tiny_t5_encoder(
    vocab_size: int, seed: int = 0, *, width: int = T5_WIDTH, d_ff: int = 48, num_heads: int = 3
):
    """A T5 v1.1-style encoder (gated-GELU, untied, no dropout), tiny."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=d_ff,
        num_layers=2,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_sd_vae(seed: int = 0, **overrides: object):
    """An SD-style AutoencoderKL: 4 down blocks (8x), 4 latent channels, scaling 0.18215;
    ``overrides`` replace any of these (SD3's VAE differs in a few fields only)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = dict(
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
    return AutoencoderKL(**{**config, **overrides})


def tiny_pixart_real(sample_size: int, seed: int = 0, **overrides: object):
    """PixArt-α-XL/2's structure (adaLN-single, learned sigma, T5 captions), 2 layers, tiny.

    ``use_additional_conditions`` is left unset, as in the real config.json: diffusers derives
    it from ``sample_size == 128`` (1024-MS) itself. PixArt-Σ's config sets it to false
    (``overrides``).
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
        **overrides,
    )
    # diffusers zero-initialises the output projection (and adaLN-single's last layer): a
    # pretrained model is not zero there, and zeros would hide every conditioning path.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


#: PixArt-Sigma-XL-2-1024-MS's scheduler_config.json (DPM-Solver over linear betas; epsilon).
SIGMA_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def save_pixart_pipeline(folder: Path, sample_size: int, *, sigma: bool = False) -> Path:
    """A PixArtAlphaPipeline folder with the real checkpoints' structure (see the module doc);
    ``sigma``: a PixArtSigmaPipeline folder as PixArt-Sigma-XL-2-*-MS (the same transformer
    class with ``use_additional_conditions`` false, the SDXL VAE's scaling 0.13025, DPM-Solver)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        LCMScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
    )
    from transformers import T5Tokenizer

    tokenizer_dir = save_sentencepiece_tokenizer(folder / "tokenizer")
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir)
    encoder = tiny_t5_encoder(len(tokenizer))
    if sigma:
        pipeline = PixArtSigmaPipeline(
            tokenizer=tokenizer,
            text_encoder=encoder,
            vae=tiny_sd_vae(scaling_factor=0.13025),
            transformer=tiny_pixart_real(sample_size, use_additional_conditions=False),
            scheduler=DPMSolverMultistepScheduler(**SIGMA_SCHEDULER),
        )
    else:
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


# --- SD3 (flow matching; configs/sd3_medium_512.toml) -------------------------------------------
# stable-diffusion-3-medium-diffusers' structure at tiny width: CLIP-L (768) and CLIP-G (1280)
# with projections become 8 and 16 wide; their penultimate hidden states, concatenated (24), are
# zero-padded to T5's width (4096 -> 32) and stacked before T5's tokens; the pooled projection is
# their two projected EOS embeddings (2048 -> 24). The VAE keeps 16 latent channels, SD3's
# scaling_factor 1.5305 and shift_factor 0.0609, and no quant convs.
SD3_CLIP_WIDTHS = (8, 16)
SD3_T5_WIDTH = 32
SD3_POOLED_WIDTH = sum(SD3_CLIP_WIDTHS)
#: SD3-medium's scheduler/scheduler_config.json (its training schedule).
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP): printable Latin-1 bytes
    stand for themselves, the others for code points from 256 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def save_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A CLIP BPE tokenizer folder as SD3 ships it (vocab.json + merges.txt + configs, no
    tokenizer.json): every byte, every byte ending a word, and merges that spell each word of
    :data:`SENTENCES` whole. ``pad_token``: CLIP-L pads with <|endoftext|>, CLIP-G with "!"."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in sorted({w for s in SENTENCES for w in s.split()}):
        left = word[0]
        for position, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if position == len(word) - 1 else "")
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special})
    )
    return folder


def tiny_clip_text_encoder(tokenizer, width: int, hidden_act: str, seed: int = 0):
    """A CLIPTextModelWithProjection (SD3's text_encoder / text_encoder_2), 2 layers, tiny."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_vae(seed: int = 0):
    """SD3's AutoencoderKL: 8x downsampling, 16 latent channels, no quant convs, scaling_factor
    1.5305 and shift_factor 0.0609."""
    return tiny_sd_vae(
        seed,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_transformer(seed: int = 0, **sd35):
    """SD3-medium's MMDiT (24 layers, 24 heads x 64, pos_embed_max_size 192 for sample_size
    128) at 2 layers, 2 heads x 16 and sample_size 8 (64 px). ``sd35``: SD3.5's extras
    (``dual_attention_layers``, ``qk_norm``)."""
    from e2ed2.engine.core.models import sd3_transformer

    torch.manual_seed(seed)
    model = sd3_transformer(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        sample_size=8,
        joint_attention_dim=SD3_T5_WIDTH,
        pooled_projection_dim=SD3_POOLED_WIDTH,
        pos_embed_max_size=12,
        **sd35,
    )
    # diffusers zero-initialises the output projections of adaLN-continuous / proj_out: a
    # pretrained model is not zero there, and zeros would hide every conditioning path.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def tiny_sd3_t5_encoder(vocab_size: int, seed: int = 0):
    """SD3's text_encoder_3 (T5 v1.1 XXL: gated-GELU, untied) at width 32."""
    return tiny_t5_encoder(vocab_size, seed, width=SD3_T5_WIDTH, d_ff=64, num_heads=4)


def save_sd3_pipeline(folder: Path) -> Path:
    """A StableDiffusion3Pipeline folder with stable-diffusion-3-medium-diffusers' structure:
    transformer/, vae/, text_encoder/ + text_encoder_2/ (CLIP with projection), text_encoder_3/
    (T5, in several safetensors shards), tokenizer/ + tokenizer_2/ (CLIP BPE files),
    tokenizer_3/ (spiece.model), scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3.0) and
    model_index.json naming the classes as the published one does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(folder / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(save_clip_tokenizer(folder / "tokenizer_2", "!"))
    tokenizer_3 = T5Tokenizer.from_pretrained(save_sentencepiece_tokenizer(folder / "tokenizer_3"))
    text_encoder_3 = tiny_sd3_t5_encoder(len(tokenizer_3))
    pipeline = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=tiny_sd3_vae(),
        text_encoder=tiny_clip_text_encoder(tokenizer, SD3_CLIP_WIDTHS[0], "quick_gelu", 1),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, SD3_CLIP_WIDTHS[1], "gelu", 2),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    # As published: T5 in shards, the tokenizers as their vocabulary files (save_pretrained
    # wrote transformers' converted tokenizer.json instead), the classes as the real index.
    shutil.rmtree(folder / "text_encoder_3")
    text_encoder_3.save_pretrained(folder / "text_encoder_3", max_shard_size="40KB")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        shutil.rmtree(folder / name)
        save_clip_tokenizer(folder / name, pad)
    shutil.rmtree(folder / "tokenizer_3")
    save_sentencepiece_tokenizer(folder / "tokenizer_3")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        tokenizer=["transformers", "CLIPTokenizer"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
        tokenizer_3=["transformers", "T5TokenizerFast"],
    )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    shards = list((folder / "text_encoder_3").glob("model-*-of-*.safetensors"))
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


#: (width, height) of :func:`save_bucket_image_folder`'s images: two each of 3:1, 1:1 and 3:4
#: (portrait), so at 64 px every PixArt bucket in use holds two samples.
BUCKET_IMAGE_SIZES = [(192, 64), (150, 50), (72, 72), (64, 64), (60, 80), (48, 64)]


def save_bucket_image_folder(folder: Path) -> Path:
    """Captioned images in three aspect ratios (see :data:`BUCKET_IMAGE_SIZES`); each image's
    left, middle and right thirds are red, green and blue (plus noise), so a crop shows which
    part of the image it kept."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    lines = []
    for i, ((width, height), caption) in enumerate(zip(BUCKET_IMAGE_SIZES, SENTENCES, strict=True)):
        third = torch.div(torch.arange(width) * 3, width, rounding_mode="floor")  # 0, 1, 2
        pixels = torch.zeros(height, width, 3)
        pixels[:, :, 0] = 200.0 * (third == 0)
        pixels[:, :, 1] = 200.0 * (third == 1)
        pixels[:, :, 2] = 200.0 * (third == 2)
        pixels += torch.randint(0, 40, (height, width, 3), generator=g)
        name = f"bucket{i}.png"
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / name)
        lines.append(json.dumps({"file": name, "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# --- Sana / SANA-Sprint (configs/sana_1024.toml) ---------------------------------------------
# Sana_1600M_1024px_diffusers' structure at tiny width: the linear-attention transformer (patch 1,
# no positional embedding, 32 latent channels), the DC-AE AutoencoderDC (six stages: 32x
# downsampling, 32 latent channels, EfficientViT blocks in the last three, scaling 0.41407), a
# Gemma-2 text encoder (Gemma2Model: 2304 wide -> 32) and a Gemma BPE tokenizer (tokenizer.json
# with byte fallback, Gemma's special-token ids). SANA-Sprint's transformer adds the guidance
# embedding and RMS qk-norm; its scheduler is SCMScheduler.
SANA_GEMMA_WIDTH = 32
SANA_LATENT_CHANNELS = 32
#: dc-ae-f32c32-sana-1.0's scaling_factor.
SANA_VAE_SCALING = 0.41407
#: Sana_1600M_1024px's scheduler (its flow_shift 3.0), as the engine samples it: flow Euler.
SANA_FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
#: SANA-Sprint_1.6B_1024px's scheduler_config.json.
SANA_SPRINT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "prediction_type": "trigflow",
    "sigma_data": 0.5,
}


def gemma_tokenizer():
    """A Gemma tokenizer (transformers' GemmaTokenizer: BPE with byte fallback, spaces as "▁",
    <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, BOS prepended) whose vocabulary and merges are
    trained here by the tokenizers library on :data:`SENTENCES` and Sana's complex human
    instruction, so a local folder needs no download: save_pretrained writes tokenizer.json and
    tokenizer_config.json, all GemmaTokenizer(Fast).from_pretrained reads."""
    import inspect

    from diffusers import SanaPipeline
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    instruction = (
        inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    )
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_model.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(byte_tokens) + 200,
        special_tokens=specials + byte_tokens,
        show_progress=False,
    )
    trainer_model.train_from_iterator(list(SENTENCES) + ["\n".join(instruction)], trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return GemmaTokenizer(vocab=trained["vocab"], merges=merges, add_bos_token=True)


def tiny_gemma2_encoder(vocab_size: int, seed: int = 0):
    """Gemma-2-2B's structure (Gemma2Model: GQA, alternating sliding-window layers, logit soft-
    capping, RMSNorm), 2 layers, 32 wide."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=SANA_GEMMA_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Gemma2Model(config).eval()


def tiny_dc_ae(seed: int = 0):
    """dc-ae-f32c32-sana-1.0's structure: six stages (32x), ResBlocks then EfficientViT blocks
    (multi-scale linear attention), 32 latent channels, RMS-normed decoder, scaling 0.41407."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    return AutoencoderDC(
        in_channels=3,
        latent_channels=SANA_LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=SANA_VAE_SCALING,
    ).eval()


def tiny_sana_transformer(seed: int = 0, *, sprint: bool = False, sample_size: int = 32):
    """Sana_1600M's SanaTransformer2DModel structure (linear self-attention, softmax cross-
    attention to the Gemma states, GLUMBConv MLP, adaLN-single), 2 layers, 16 wide; ``sprint``:
    SANA-Sprint's guidance embedding and RMS qk-norm."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    model = SanaTransformer2DModel(
        in_channels=SANA_LATENT_CHANNELS,
        out_channels=SANA_LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=SANA_GEMMA_WIDTH,
        mlp_ratio=2.5,
        sample_size=sample_size,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        guidance_embeds=sprint,
        qk_norm="rms_norm_across_heads" if sprint else None,
    )
    # diffusers zero-initialises some output layers; a trained model is not zero there.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def save_sana_pipeline(folder: Path, *, sprint: bool = False) -> Path:
    """A SanaPipeline folder with Sana_1600M_1024px_diffusers' structure (transformer/, vae/ =
    AutoencoderDC, text_encoder/ = Gemma2Model in safetensors shards, tokenizer/ = Gemma's
    tokenizer.json, scheduler/); ``sprint``: a SanaSprintPipeline folder (guidance-embedded
    transformer, SCMScheduler). Sana's own folder ships DPM-Solver; this one the flow Euler
    scheduler at its flow_shift, what the engine samples and exports."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaSprintPipeline,
        SCMScheduler,
    )

    tokenizer = gemma_tokenizer()
    encoder = tiny_gemma2_encoder(len(tokenizer))
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=tiny_dc_ae(),
        transformer=tiny_sana_transformer(sprint=sprint),
    )
    if sprint:
        pipeline = SanaSprintPipeline(scheduler=SCMScheduler(**SANA_SPRINT_SCHEDULER), **parts)
    else:
        pipeline = SanaPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SANA_FLOW_SCHEDULER), **parts
        )
    pipeline.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "text_encoder")
    encoder.save_pretrained(folder / "text_encoder", max_shard_size="40KB")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(tokenizer=["transformers", "GemmaTokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    shards = list((folder / "text_encoder").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1, "the tiny Gemma-2 must be saved in several shards"
    return folder
