"""LoRA adapters (peft) on the denoiser: one shared adapter, or one adapter per sampler step.

``model.lora_rank = r >= 1`` freezes the whole denoiser and injects rank-r LoRA layers
(``peft.inject_adapter_in_model``) into ``model.lora_target_modules``: each adapted linear map
``W x`` becomes ``W x + (alpha / r) B A x`` with ``A`` (r, in) and ``B`` (out, r) trainable. peft
initialises ``B = 0``, so training starts from the pretrained network exactly. (diffusers'
``add_adapter`` is the same injection, but ``PixArtTransformer2DModel`` has no ``PeftAdapterMixin``
in diffusers 0.42, so peft is called directly.)

Shared (``share_across_steps=true``): one adapter, ``"default"``, used by every step.

Per-step (``share_across_steps=false``): :class:`PerStepLoRA` holds the one frozen base with K
adapters ``step_0 .. step_{K-1}``; its item ``i`` (:class:`AdapterStep`) is step i's network. The
trajectory indexes it like a list of per-step networks (paper App. D.1), but the K networks share
every base weight: K x (adapter) parameters instead of K x (model). The active adapter is chosen
*inside* each call, because the checkpoint policies rerun step i's forward during backward, in
reverse step order: an adapter set once before the unroll would be wrong for every recompute.

peft's ``set_adapter`` is not used for that switch: it also sets ``requires_grad=False`` on every
inactive adapter, and all K must stay trainable (one optimizer, one DeepSpeed engine, gradients
arriving for step i while step j's forward is being recomputed). :func:`_activate` sets only the
layers' active-adapter list, which is all peft's LoRA forward reads.

Files: adapters are written in diffusers' LoRA format (``pytorch_lora_weights.safetensors``: keys
``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, the ``LoraConfig`` as JSON in the
safetensors metadata under ``lora_adapter_metadata``, as ``save_lora_weights`` writes them), and
read back with :func:`load_lora_weights`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..config.model import ModelConfig

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

__all__ = [
    "DEFAULT_ADAPTER",
    "LORA_WEIGHT_NAME",
    "AdapterStep",
    "PerStepLoRA",
    "adapter_names",
    "add_lora",
    "lora_base",
    "lora_config",
    "lora_layers",
    "lora_state_dict",
    "lora_weight_name",
    "load_lora_weights",
    "plain_transformer",
    "save_lora_weights",
]

DEFAULT_ADAPTER = "default"
#: diffusers' file name for LoRA weights (``LORA_WEIGHT_NAME_SAFE``).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers' metadata key for the adapter's LoraConfig, and the prefix of a pipeline's
# transformer in a LoRA file.
_METADATA_KEY = "lora_adapter_metadata"
_PREFIX = "transformer."


def adapter_names(config: ModelConfig, num_steps: int) -> list[str]:
    """The adapters of a run: ``["default"]`` shared, else ``["step_0", .., "step_{K-1}"]``."""
    if config.share_across_steps:
        return [DEFAULT_ADAPTER]
    return [f"step_{i}" for i in range(num_steps)]


def lora_weight_name(adapter: str) -> str:
    """File name of one adapter in an export: diffusers' default for the shared adapter,
    ``pytorch_lora_weights_step_{i}.safetensors`` per step (``weight_name=`` in diffusers)."""
    if adapter == DEFAULT_ADAPTER:
        return LORA_WEIGHT_NAME
    return LORA_WEIGHT_NAME.replace(".safetensors", f"_{adapter}.safetensors")


def lora_config(config: ModelConfig) -> LoraConfig:
    """``model.lora_*`` as a peft ``LoraConfig`` (peft's default init: A Kaiming, B = 0)."""
    # lazy: peft (with transformers) adds ~4 s; only LoRA runs (model.lora_rank > 0) need it
    from peft import LoraConfig

    if config.lora_rank < 1:
        raise ValueError(f"model.lora_rank={config.lora_rank}: LoRA is off")
    alpha = config.lora_rank if config.lora_alpha is None else config.lora_alpha
    return LoraConfig(
        r=config.lora_rank,
        # peft annotates lora_alpha as an int; it takes a float (the scale alpha / r is a float).
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
    )


def lora_layers(model: nn.Module) -> tuple[LoraLayer, ...]:
    """Every peft LoRA layer inside ``model``, in module order."""
    # lazy: peft (with transformers) adds ~4 s; only LoRA runs (model.lora_rank > 0) need it
    from peft.tuners.lora import LoraLayer

    return tuple(m for m in model.modules() if isinstance(m, LoraLayer))


def _inject(model: nn.Module, config: LoraConfig, names: Sequence[str]) -> None:
    # lazy: peft (with transformers) adds ~4 s; only LoRA runs (model.lora_rank > 0) need it
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        # A second adapter on the same model is what per-step LoRA means; peft warns about it.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for name in names:
            # One config object per adapter: peft keeps it in model.peft_config[name].
            inject_adapter_in_model(copy.deepcopy(config), model, adapter_name=name)


def _activate(layers: Sequence[LoraLayer], adapter: str) -> None:
    # What peft's LoraLayer.forward reads (``active_adapters``); unlike ``set_adapter`` this
    # leaves requires_grad of the other adapters alone (see the module docstring).
    for layer in layers:
        layer._active_adapter = [adapter]


def _check_injected(model: nn.Module, config: ModelConfig) -> None:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"model.lora_target_modules={list(config.lora_target_modules)} match no module of "
            f"{type(model).__name__}"
        )
    if not config.fused_kernels:
        return
    # The fused timestep embedding reads its linear layers' weights directly: an adapter there
    # would be skipped without a word.
    # lazy: e2ed2.kernels imports triton (absent off Linux); only fused-kernel runs need it
    from e2ed2.kernels import FusedPixArtTimestepEmbeddings

    for fused in (m for m in model.modules() if isinstance(m, FusedPixArtTimestepEmbeddings)):
        if any(layer is m for m in fused.modules() for layer in layers):
            raise ValueError(
                f"model.lora_target_modules={list(config.lora_target_modules)} adapts the "
                "timestep embedding, which model.fused_kernels=true computes from its weights "
                "directly (the adapter would be ignored); target other modules or turn the "
                "fused kernels off"
            )


def add_lora(model: nn.Module, config: ModelConfig, num_steps: int) -> nn.Module:
    """``model`` with ``model.lora_*`` adapters, frozen but for them (in place).

    Returns ``model`` itself (shared: one ``"default"`` adapter) or a :class:`PerStepLoRA` over it
    (``share_across_steps=false``: one adapter per step). Build it before DeepSpeed wraps the
    model, so the engine and its optimizer see the adapters.
    """
    names = adapter_names(config, num_steps)
    model.requires_grad_(False)
    try:
        _inject(model, lora_config(config), names)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(
            f"model.lora_target_modules={list(config.lora_target_modules)} match no module of "
            f"{type(model).__name__} ({err})"
        ) from err
    _check_injected(model, config)
    if config.share_across_steps:
        return model
    return PerStepLoRA(model, names)


def _run_block(
    block: Callable[..., object], layers: Sequence[LoraLayer], adapter: str, *args: object
) -> object:
    _activate(layers, adapter)
    return block(*args)


class AdapterStep(nn.Module):
    """One sampler step's network: the shared base with this step's adapter switched on at every
    call, forward and recompute alike.

    Two kinds of recompute run the network again during backward: a step-level checkpoint
    (``step``, ``offload``, ``selective``, ``block``) reruns this forward, which switches the
    adapter; diffusers' per-block checkpointing (``block``, ``block_offload``) reruns single
    transformer blocks, long after this forward returned and after the other steps' forwards.
    For the latter the forward hands diffusers a checkpoint function (its
    ``_gradient_checkpointing_func``, the hook ``enable_gradient_checkpointing`` takes) that
    checkpoints "switch to this adapter, then run the block": the recompute replays the switch.

    ``module`` is the base, so ``unwrap`` and ``denoise`` see the diffusers model's forward
    signature and config. Not registered in :class:`PerStepLoRA`: the base is registered there
    once, not K times (ZeRO-3 hooks every module it finds; a state dict would hold K copies).
    """

    def __init__(self, base: nn.Module, adapter: str, layers: Sequence[LoraLayer]) -> None:
        super().__init__()
        self.module = base
        self.adapter = adapter
        # Tuples: not registered as children.
        self._layers = tuple(layers)
        # diffusers blocks with per-block checkpointing; Any: diffusers declares the checkpoint
        # function attribute None-typed, and it holds a function while checkpointing is on.
        self._checkpointing: tuple[Any, ...] = tuple(
            m for m in base.modules() if hasattr(m, "gradient_checkpointing")
        )

    def forward(self, *args: object, **kwargs: object) -> object:
        _activate(self._layers, self.adapter)
        swapped = [m for m in self._checkpointing if m.gradient_checkpointing]
        inner = [m._gradient_checkpointing_func for m in swapped]
        for module, checkpoint_fn in zip(swapped, inner, strict=True):
            module._gradient_checkpointing_func = functools.partial(
                self._checkpoint_block, checkpoint_fn
            )
        try:
            return self.module(*args, **kwargs)
        finally:
            for module, checkpoint_fn in zip(swapped, inner, strict=True):
                module._gradient_checkpointing_func = checkpoint_fn

    def _checkpoint_block(
        self, checkpoint_fn: Callable[..., object], block: nn.Module, *args: object
    ) -> object:
        # diffusers' checkpoint functions call ``module.__call__``; a partial has one.
        switched = functools.partial(_run_block, block, self._layers, self.adapter)
        return checkpoint_fn(switched, *args)


class PerStepLoRA(nn.Module):
    """One frozen base with K adapters; ``self[i]`` is step i's network (an :class:`AdapterStep`).

    A ``Sequence`` of per-step networks for the trajectory (``run_steps`` indexes it by absolute
    step, as an ``nn.ModuleList`` of copies), and one ``nn.Module`` for DeepSpeed (parameters and
    state dict hold the base once: ``base.*``).
    """

    def __init__(self, base: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.base = base
        present = set(getattr(base, "peft_config", {}))
        missing = [name for name in names if name not in present]
        if missing:
            raise ValueError(f"the base model has no adapter {missing} (it has {sorted(present)})")
        self.names = tuple(names)
        layers = lora_layers(base)
        self._steps = tuple(AdapterStep(base, name, layers) for name in names)

    def __len__(self) -> int:
        return len(self._steps)

    def __getitem__(self, index: int) -> AdapterStep:
        return self._steps[index]

    def __iter__(self) -> Iterator[AdapterStep]:
        return iter(self._steps)

    def forward(self, *args: object, **kwargs: object) -> object:
        raise TypeError(
            "PerStepLoRA has one network per sampler step: call per_step[i], not the whole"
        )


# Registered, not inherited: nn.Module and the Sequence ABC have different metaclasses.
Sequence.register(PerStepLoRA)


def lora_base(module: nn.Module) -> nn.Module:
    """The diffusers model carrying the adapters (a :class:`PerStepLoRA`'s base, or itself)."""
    return module.base if isinstance(module, PerStepLoRA) else module


def lora_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """``adapter``'s weights in diffusers' LoRA-file layout (``transformer.<module>.lora_A.weight``;
    peft's ``get_peft_model_state_dict`` without the adapter name, prefixed as a pipeline's
    transformer)."""
    # lazy: peft (with transformers) adds ~4 s; only LoRA runs (model.lora_rank > 0) need it
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {_PREFIX + key: value.detach().cpu().contiguous() for key, value in state.items()}


def _metadata(model: nn.Module, adapter: str) -> dict[str, str]:
    # As diffusers' save_lora_weights: the LoraConfig's fields, prefixed like the weights, as one
    # JSON string (safetensors metadata values are strings).
    peft_config = cast("dict[str, LoraConfig]", model.peft_config)  # set by peft's injection
    fields = peft_config[adapter].to_dict()
    packed = {
        _PREFIX + key: sorted(value) if isinstance(value, set) else value
        for key, value in fields.items()
    }
    return {"format": "pt", _METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def save_lora_weights(
    model: nn.Module, directory: str | os.PathLike, adapter: str, *, weight_name: str | None = None
) -> Path:
    """Writes ``adapter`` of ``model`` (a diffusers model with peft adapters) as a diffusers LoRA
    file ``directory/weight_name`` (default :func:`lora_weight_name`); returns its path."""
    path = Path(directory) / (weight_name or lora_weight_name(adapter))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model, adapter), str(path), metadata=_metadata(model, adapter))
    return path


def load_lora_weights(
    model: nn.Module, path: str | os.PathLike, adapter: str = DEFAULT_ADAPTER
) -> nn.Module:
    """Adds the adapter in diffusers LoRA file ``path`` (or ``path/pytorch_lora_weights
    .safetensors``) to ``model`` under the name ``adapter``, in place; returns ``model``.

    What diffusers' ``load_lora_adapter`` does for models with ``PeftAdapterMixin``: the
    ``LoraConfig`` from the file's metadata, ``inject_adapter_in_model``, then
    ``set_peft_model_state_dict``. Every key of the file must land in the model.
    """
    # lazy: peft (with transformers) adds ~4 s; only LoRA runs (model.lora_rank > 0) need it
    from peft import LoraConfig, set_peft_model_state_dict

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ValueError(
            f"{path} has no {_METADATA_KEY!r} metadata (the LoraConfig diffusers writes beside "
            "the weights); cannot tell its rank, alpha and target modules"
        )
    packed = json.loads(metadata[_METADATA_KEY])
    fields = {k[len(_PREFIX) :]: v for k, v in packed.items() if k.startswith(_PREFIX)}
    state = {k[len(_PREFIX) :]: v for k, v in load_file(str(path)).items() if k.startswith(_PREFIX)}
    if not state:
        raise ValueError(f"{path} holds no {_PREFIX}* LoRA weights")
    _inject(model, LoraConfig(**fields), [adapter])
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} weights match no module, e.g. {unexpected[0]}")
    return model


def plain_transformer(model: nn.Module, merge: str | None = None) -> nn.Module:
    """A copy of ``model`` without peft layers: the base weights, or with adapter ``merge``
    merged in (peft's ``merge``: ``W + (alpha / r) B A``). ``model`` is left as it is."""
    # lazy: diffusers adds ~3 s over torch; only plain_transformer's export needs it
    from diffusers.utils import recurse_remove_peft_layers

    plain = copy.deepcopy(model)
    if merge is not None:
        for layer in lora_layers(plain):
            layer.merge(adapter_names=[merge])
    recurse_remove_peft_layers(plain)
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    return plain
