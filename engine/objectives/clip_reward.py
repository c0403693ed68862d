"""A CLIP-similarity reward for real data: the standard differentiable scorer of DRaFT / AlignProp.

DRaFT (Clark et al. 2024, Sec. 4) and AlignProp (Prabhudesai et al. 2023, Sec. 4.1) fine-tune on
``r(x, c) = cos(E_img(x), E_txt(c))``, the cosine similarity of a frozen CLIP model's image and
text embeddings of the sample ``x`` and its prompt ``c``. Here ``x`` is the decoded final
sample (B, 3, H, W) in [-1, 1] and ``c`` its caption (the shards store them). The reward is the
plain cosine in [-1, 1]; CLIP's ``logit_scale`` (100 for OpenAI's checkpoints) is not applied:
it is one constant factor, which ``objective.reward_weight`` already is (reward_weight = 100 on
this term is ``-mean logits_per_image``; CLIPScore, Hessel et al. 2021, is 100 * max(cos, 0)).

The image goes through CLIPImageProcessor's steps, made differentiable: [-1, 1] -> [0, 1]
(clamped: what the processor's uint8 input holds), resize so the shortest side is the
processor's ``size`` (bicubic or bilinear as its ``resample``, antialiased: the
PIL / torchvision resize it replaces antialiases when downscaling), clamp to [0, 1] (the
processor's resized image is uint8 again), center crop to ``crop_size`` (top / left offsets as
the processor: ``int((H - h) / 2)``), normalise with its ``image_mean`` / ``image_std``. The
differences from the processor are its uint8 rounding and PIL's fixed-point filter; on an
image already at the crop size (no resize) the two agree to float rounding.

Text features are computed once per caption (no grad) and kept in a bounded cache keyed by the
caption string, so the text tower runs for a caption the first time it is drawn, not on every
step. The image tower runs in the dtype the scorer is loaded in (the run's compute dtype:
bf16 runs score in bf16); preprocessing and the cosine are float32.

The folder is a transformers ``CLIPModel`` saved with ``save_pretrained`` together with its
``CLIPProcessor`` (or ``CLIPImageProcessor`` + tokenizer): ``config.json`` (model_type
"clip"), the weights, ``preprocessor_config.json`` (or transformers 5's
``processor_config.json``) and the tokenizer files, e.g. a local copy of
openai/clip-vit-large-patch14. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from transformers import CLIPModel
    from transformers.models.clip.configuration_clip import (
        CLIPConfig,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

__all__ = [
    "CLIP_MODEL_TYPE",
    "TEXT_CACHE_ENTRIES",
    "ClipPreprocess",
    "ClipReward",
    "check_clip_folder",
    "clip_pixel_values",
]

#: ``model_type`` in the ``config.json`` of a transformers ``CLIPModel`` (vision + text towers).
CLIP_MODEL_TYPE = "clip"
#: Captions whose text features stay cached (least recently used dropped first). At ViT-L/14's
#: 768-wide projection in float32 that is 48 MiB; a larger caption set re-encodes each caption
#: at most once per epoch, one text-tower call per batch for the captions not cached.
TEXT_CACHE_ENTRIES = 16384
# PIL resampling codes (PILImageResampling) the differentiable resize reproduces.
_RESAMPLE_MODES: dict[int, Literal["bilinear", "bicubic"]] = {2: "bilinear", 3: "bicubic"}
_KEY = "objective.reward_path"


def check_clip_folder(path: str | os.PathLike) -> None:
    """Raises (naming ``objective.reward_path`` and the folder) unless ``path`` is a local
    ``CLIPModel`` folder: ``config.json`` with model_type "clip", an image processor config
    and tokenizer files. Reads JSON only (no model is built)."""
    folder = os.fspath(path)
    fix = (
        "save a transformers CLIPModel and its CLIPProcessor there with save_pretrained (e.g. a "
        "local copy of openai/clip-vit-large-patch14)"
    )
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{_KEY}={folder!r} is not a folder; {fix}")
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{_KEY}={folder!r} has no config.json; {fix}")
    try:
        with open(config_file) as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{_KEY}={folder!r}: config.json is not a JSON object ({err})") from err
    if model_type != CLIP_MODEL_TYPE:
        raise ValueError(
            f"{_KEY}={folder!r}: config.json has model_type {model_type!r}, not a CLIPModel "
            f"({CLIP_MODEL_TYPE!r}: image and text towers); {fix}"
        )
    if not _has_image_processor_config(folder):
        raise FileNotFoundError(
            f"{_KEY}={folder!r} has no preprocessor_config.json (nor a processor_config.json "
            "with an image_processor): save the CLIPProcessor into the folder too"
        )
    has_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        raise FileNotFoundError(
            f"{_KEY}={folder!r} has no tokenizer (tokenizer.json, or vocab.json + merges.txt): "
            "save the CLIPProcessor (or the CLIP tokenizer) into the folder too"
        )


def _has_image_processor_config(folder: str) -> bool:
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return True
    processor_file = os.path.join(folder, "processor_config.json")  # transformers 5
    if not os.path.isfile(processor_file):
        return False
    try:
        with open(processor_file) as handle:
            return "image_processor" in json.load(handle)
    except (OSError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's steps for an image tensor: ``resize`` (``("shortest_edge", S)`` or
    ``("exact", (H, W))``, None = none), its interpolation, ``crop`` (H, W) or None, and the
    per-channel ``mean`` / ``std`` of [0, 1] pixels (None = no normalisation)."""

    resize: tuple[str, Any] | None
    mode: Literal["bilinear", "bicubic"]
    crop: tuple[int, int] | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_processor(cls, processor: Any, where: str) -> ClipPreprocess:
        """The steps of a loaded ``CLIPImageProcessor`` (transformers 4 dicts or 5 SizeDicts);
        ValueError naming ``where`` for a setting the differentiable path does not reproduce."""
        resize: tuple[str, Any] | None = None
        mode: Literal["bilinear", "bicubic"] = "bicubic"
        if getattr(processor, "do_resize", True):
            size = processor.size
            if size.get("shortest_edge") is not None and size.get("longest_edge") is None:
                resize = ("shortest_edge", int(size["shortest_edge"]))
            elif size.get("height") is not None and size.get("width") is not None:
                resize = ("exact", (int(size["height"]), int(size["width"])))
            else:
                raise ValueError(f"{where}: image processor size {dict(size)} is not supported")
            resample = int(getattr(processor, "resample", 3))
            if resample not in _RESAMPLE_MODES:
                raise ValueError(
                    f"{where}: image processor resample={resample} is not supported (2 = "
                    "bilinear, 3 = bicubic)"
                )
            mode = _RESAMPLE_MODES[resample]
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
        rescale = float(getattr(processor, "rescale_factor", 1 / 255))
        if not getattr(processor, "do_rescale", True) or abs(rescale * 255 - 1) > 1e-6:
            raise ValueError(
                f"{where}: the image processor must rescale 0..255 to [0, 1] (do_rescale, "
                f"rescale_factor 1/255), got do_rescale={processor.do_rescale}, "
                f"rescale_factor={rescale}"
            )
        mean = std = None
        if getattr(processor, "do_normalize", True):
            # One value per RGB channel.
            mean = cast("tuple[float, float, float]", tuple(float(v) for v in processor.image_mean))
            std = cast("tuple[float, float, float]", tuple(float(v) for v in processor.image_std))
        return cls(resize=resize, mode=mode, crop=crop, mean=mean, std=std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of :func:`clip_pixel_values`'s output for a (height, width) input."""
        height, width = self.resized_size(height, width)
        return self.crop if self.crop is not None else (height, width)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after the resize: transformers' ``get_resize_output_image_size`` for a
        shortest edge (the long side scaled and truncated to an int)."""
        if self.resize is None:
            return height, width
        kind, value = self.resize
        if kind == "exact":
            return value
        short, long = sorted((height, width))
        new_long = int(value * long / short)
        return (value, new_long) if height <= width else (new_long, value)


def clip_pixel_values(pixels: torch.Tensor, preprocess: ClipPreprocess) -> torch.Tensor:
    """CLIP's ``pixel_values`` (B, 3, h, w) float32 of images (B, 1 or 3, H, W) in [-1, 1],
    differentiable in ``pixels`` (see the module docstring for each step; grey images are
    repeated over RGB)."""
    if pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(
            f"the CLIP reward scores (B, 1 or 3, H, W) images, got shape {tuple(pixels.shape)}"
        )
    images = ((pixels.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
    size = preprocess.resized_size(*images.shape[-2:])
    if size != tuple(images.shape[-2:]):
        images = F.interpolate(
            images, size=size, mode=preprocess.mode, align_corners=False, antialias=True
        )
        images = images.clamp(0, 1)  # bicubic overshoots; the processor's uint8 clips it
    if preprocess.crop is not None:
        crop_h, crop_w = preprocess.crop
        height, width = images.shape[-2:]
        if crop_h > height or crop_w > width:  # as the processor: zero-pad to the crop first
            pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
            images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
            height, width = images.shape[-2:]
        top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
        images = images[..., top : top + crop_h, left : left + crop_w]
    if preprocess.mean is not None:
        mean = torch.tensor(preprocess.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.std, device=images.device).view(1, 3, 1, 1)
        images = (images - mean) / std
    return images


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is projected; 4 the tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _tower_configs(config: CLIPConfig) -> tuple[CLIPVisionConfig, CLIPTextConfig]:
    """The vision and text sub-configs of a built CLIPModel's config. CLIPConfig annotates them
    as ``dict | config | None`` (what its constructor accepts); construction turns a dict or
    None into the config class, which the isinstance checks narrow to."""
    # lazy: transformers adds ~1 s over torch and is already loaded here (the model came from it)
    from transformers.models.clip.configuration_clip import CLIPTextConfig, CLIPVisionConfig

    vision, text = config.vision_config, config.text_config
    if not isinstance(vision, CLIPVisionConfig) or not isinstance(text, CLIPTextConfig):
        raise TypeError(
            f"{_KEY}: the CLIP config's sub-configs are {type(vision).__name__} and "
            f"{type(text).__name__}, not CLIPVisionConfig and CLIPTextConfig"
        )
    return vision, text


class ClipReward(nn.Module):
    """The frozen CLIP scorer: ``forward(pixels, captions)`` -> (B,) float32 cosine similarity
    of each decoded sample and its caption. Eval mode, no parameter requires grad; only the
    image path is in the graph."""

    def __init__(self, model: CLIPModel, tokenizer: Any, preprocess: ClipPreprocess) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        vision_config, text_config = _tower_configs(model.config)
        # CLIPVisionConfig types image_size as any model's (int, pair, None); CLIP's patch
        # embedding divides it by the patch size as one int, so a built CLIPModel holds an int.
        image_size = int(cast(int, vision_config.image_size))
        if preprocess.crop is not None and preprocess.crop != (image_size, image_size):
            raise ValueError(
                f"{_KEY}: the image processor crops to {preprocess.crop}, but the CLIP vision "
                f"tower takes {image_size}x{image_size} images"
            )
        self.image_size = image_size
        self.max_text_tokens = min(
            int(tokenizer.model_max_length), int(text_config.max_position_embeddings)
        )
        # caption -> (D,) float32 unit text embedding, on the device it was computed on.
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.eval()

    @classmethod
    def from_folder(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ClipReward:
        """The scorer in a local CLIP folder (see :func:`check_clip_folder`), weights in
        ``dtype``."""
        # lazy: transformers adds ~1 s over torch; only the CLIP reward needs it
        import transformers
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        folder = os.fspath(path)
        check_clip_folder(folder)
        # transformers 5 renamed torch_dtype to dtype.
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        dtype_kwargs: dict[str, Any] = {dtype_key: dtype}
        model = CLIPModel.from_pretrained(folder, local_files_only=True, **dtype_kwargs)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, ClipPreprocess.from_processor(processor, f"{_KEY}={folder!r}"))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    def _apply(self, fn: Any, recurse: bool = True) -> ClipReward:
        self._text_cache.clear()  # cached features would stay on the old device / dtype
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> ClipReward:
        return super().train(False)  # frozen: always eval mode

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, D) float32 unit text embeddings, each caption through the text tower once while
        it stays in the cache (:data:`TEXT_CACHE_ENTRIES`)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        if missing:
            device = self.model.logit_scale.device
            tokens = self.tokenizer(
                missing,
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            ).to(device)
            features = _pooled(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            ).float()
            for caption, feature in zip(missing, F.normalize(features, dim=-1), strict=True):
                self._text_cache[caption] = feature
        for caption in captions:
            self._text_cache.move_to_end(caption)
        rows = torch.stack([self._text_cache[c] for c in captions])
        while len(self._text_cache) > TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        return rows

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 unit image embeddings of (B, 1 or 3, H, W) images in [-1, 1], in the
        graph of ``pixels``."""
        values = clip_pixel_values(pixels, self.preprocess).to(self.dtype)
        return F.normalize(
            _pooled(self.model.get_image_features(pixel_values=values)).float(), dim=-1
        )

    def forward(
        self, pixels: torch.Tensor, captions: Sequence[str], *, checkpointed: bool = False
    ) -> torch.Tensor:
        """(B,) float32: ``cos(E_img(pixels_i), E_txt(captions_i))``. ``checkpointed``: keep only
        ``pixels`` for backward and re-run the image tower there (activation checkpointing)."""
        if len(captions) != pixels.shape[0]:
            raise ValueError(
                f"the CLIP reward needs one caption per image: {pixels.shape[0]} images, "
                f"{len(captions)} captions"
            )
        text = self.text_features(captions).to(pixels.device)
        if checkpointed and torch.is_grad_enabled() and pixels.requires_grad:
            image = checkpoint(self.image_features, pixels, use_reentrant=False)
        else:
            image = self.image_features(pixels)
        return (image * text).sum(-1)
