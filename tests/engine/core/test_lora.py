"""LoRA (peft) on the denoiser: only adapters train, every checkpoint policy gives plain
autograd's adapter gradients, and per-step LoRA routes step i through adapter i only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from e2ed2.engine import (
    SamplerConfig,
    Trajectory,
    TrajectoryConfig,
    TrajectoryPlan,
    build_schedule,
    denoise,
)
from e2ed2.engine.config import CHECKPOINT_POLICIES, ModelConfig
from e2ed2.engine.core.lora import (
    PerStepLoRA,
    add_lora,
    load_lora_weights,
    lora_layers,
    plain_transformer,
    save_lora_weights,
)

NUM_STEPS = 4
BATCH = 2
LATENT = (BATCH, 4, 8, 8)
POLICIES = [p for p in CHECKPOINT_POLICIES if p != "none"]


def _randomize_adapters(module: torch.nn.Module, seed: int = 0) -> None:
    """peft starts B at 0 (so A gets no gradient and every adapter is the identity): give every
    adapter weight its own random value, so gradients flow through A and B and steps differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in module.named_parameters():
            if param.requires_grad:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))


def _lora(make_pixart, *, shared: bool, rank: int = 4, seed: int = 0) -> torch.nn.Module:
    config = ModelConfig(lora_rank=rank, lora_alpha=2.0 * rank, share_across_steps=shared)
    module = add_lora(make_pixart(), config, NUM_STEPS)
    _randomize_adapters(module, seed)
    return module


def _unroll_grads(
    networks, policy: str, cond, clean, *, grad_start: int = 0
) -> dict[str, torch.Tensor | None]:
    """{parameter name: gradient} of the trainable parameters after one K-step unroll."""
    modules = list(networks) if isinstance(networks, torch.nn.ModuleList) else [networks]
    for module in modules:
        module.zero_grad(set_to_none=True)
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=NUM_STEPS, checkpoint=policy),
        build_schedule(SamplerConfig(), NUM_STEPS),
    )
    plan = TrajectoryPlan(num_steps=NUM_STEPS, start_index=0, grad_start_index=grad_start)
    sample, _ = trajectory(
        networks, cond, clean=clean, plan=plan, generator=torch.Generator().manual_seed(3)
    )
    (sample - clean).square().mean().backward()
    return {
        f"{i}/{name}": None if p.grad is None else p.grad.detach().clone()
        for i, module in enumerate(modules)
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def _assert_close_grads(got: dict, ref: dict, label: str) -> None:
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        g = got[name]
        assert (g is None) == (r is None), f"{label}: {name} gradient presence differs"
        if r is None:
            continue
        assert r.abs().sum() > 0, f"{name}: zero reference gradient, the test would be vacuous"
        err = ((g - r).abs().max() / r.abs().max()).item()
        assert err <= 1e-5, f"{label}: {name} relative gradient error {err:.2e} > 1e-5"


# ----------------------------------------------------------------------------------- trainable


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_step"])
def test_only_adapters_train_and_the_base_stays_put(make_pixart, make_conditioning, shared):
    module = _lora(make_pixart, shared=shared)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    layers = lora_layers(module)
    adapters = 1 if shared else NUM_STEPS
    # Default targets: to_q/k/v/out.0 of both attentions + the two feed-forward linears,
    # 10 per block, each with an A and a B per adapter.
    assert len(layers) == 10 * 2
    assert len(trainable) == 2 * len(layers) * adapters
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    base_before = {
        n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad
    }
    adapters_before = {
        n: p.detach().clone() for n, p in module.named_parameters() if n in trainable
    }

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    # (A PerStepLoRA goes to the trajectory as it is: it is indexed per step, as copies are.)
    _unroll_grads(module, "step", make_conditioning(BATCH), torch.randn(LATENT))
    optimizer.step()

    for name, param in module.named_parameters():
        if name in trainable:
            assert not torch.equal(param, adapters_before[name]), f"{name} did not train"
        else:
            assert param.grad is None and torch.equal(param, base_before[name]), name


# ------------------------------------------------------------------ policies = plain autograd


@pytest.mark.parametrize("policy", POLICIES)
def test_shared_lora_gradients_match_plain_autograd(make_pixart, make_conditioning, policy):
    module = _lora(make_pixart, shared=True)
    cond, clean = make_conditioning(BATCH), torch.randn(LATENT)
    ref = _unroll_grads(module, "none", cond, clean)
    _assert_close_grads(_unroll_grads(module, policy, cond, clean), ref, policy)


def _per_step_reference(per_step: PerStepLoRA) -> torch.nn.ModuleList:
    """K independent copies of the base, copy i running adapter i through peft's own
    ``set_adapter``: the per-step networks that per-step LoRA must equal."""
    from peft.tuners.tuners_utils import set_adapter

    copies = torch.nn.ModuleList()
    for name in per_step.names:
        base = copy.deepcopy(per_step.base)
        set_adapter(base, name)
        copies.append(base)
    return copies


@pytest.mark.parametrize("policy", ["none", *POLICIES])
def test_per_step_lora_equals_independent_per_step_networks(make_pixart, make_conditioning, policy):
    """Each step's adapter gets exactly the gradient of copy i running adapter i (plain
    autograd), under every policy: the recompute in backward, in reverse step order, switches to
    the right adapter, and no adapter picks up another step's gradient."""
    per_step = _lora(make_pixart, shared=False)
    reference = _per_step_reference(per_step)
    cond, clean = make_conditioning(BATCH), torch.randn(LATENT)
    ref = _unroll_grads(reference, "none", cond, clean)
    # Copy i's gradient of adapter step_i (its other adapters are off and frozen there).
    expected = {
        f"0/base.{name[len(f'{i}/') :]}": grad
        for name, grad in ref.items()
        for i in range(NUM_STEPS)
        if name.startswith(f"{i}/") and f".step_{i}." in name
    }
    got = _unroll_grads(per_step, policy, cond, clean)
    _assert_close_grads(got, expected, policy)
    # All K adapters stay trainable (peft's set_adapter would have frozen the inactive ones),
    # and diffusers' block checkpoint function is its own again after each call.
    assert all(p.requires_grad for n, p in per_step.named_parameters() if "lora_" in n)
    assert "_checkpoint_block" not in repr(per_step.base._gradient_checkpointing_func)


@pytest.mark.parametrize("policy", ["none", "step"])
def test_per_step_truncation_trains_only_the_differentiated_steps(
    make_pixart, make_conditioning, policy
):
    per_step = _lora(make_pixart, shared=False)
    grads = _unroll_grads(
        per_step, policy, make_conditioning(BATCH), torch.randn(LATENT), grad_start=NUM_STEPS - 1
    )
    last = f".step_{NUM_STEPS - 1}."
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if last in n)
    assert all(g is None for n, g in grads.items() if last not in n)


def test_per_step_adapters_give_different_networks(make_pixart, make_conditioning) -> None:
    per_step = _lora(make_pixart, shared=False)
    cond, x = make_conditioning(BATCH), torch.randn(LATENT)
    with torch.no_grad():
        outs = [denoise(per_step[i], x, 500, cond) for i in range(NUM_STEPS)]
        again = denoise(per_step[0], x, 500, cond)  # after the others: the switch is per call
    assert all(not torch.allclose(outs[0], out) for out in outs[1:])
    torch.testing.assert_close(again, outs[0], rtol=0, atol=0)
    with pytest.raises(TypeError, match="per_step\\[i\\]"):
        per_step(x)
    # One base in the module tree and the state dict, not K.
    assert len(per_step) == NUM_STEPS and list(dict(per_step.named_children())) == ["base"]
    assert all(k.startswith("base.") for k in per_step.state_dict())


# ------------------------------------------------------------------------ files and merging


def test_lora_file_round_trip_and_merge(make_pixart, make_conditioning, tmp_path: Path) -> None:
    """A saved adapter, loaded onto a fresh copy of the base, gives the trained network; merged
    weights (no peft layers) give it too."""
    from safetensors import safe_open

    trained = _lora(make_pixart, shared=True)
    path = save_lora_weights(trained, tmp_path, "default")
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert not any(".default." in k for k in keys)  # diffusers' layout: no adapter name

    base = plain_transformer(trained)
    assert not lora_layers(base)
    loaded = load_lora_weights(plain_transformer(trained), path)
    merged = plain_transformer(trained, merge="default")
    assert not lora_layers(merged)
    cond, x = make_conditioning(BATCH), torch.randn(LATENT)
    with torch.no_grad():
        want = denoise(trained, x, 700, cond)
        torch.testing.assert_close(denoise(loaded, x, 700, cond), want, rtol=0, atol=0)
        torch.testing.assert_close(denoise(merged, x, 700, cond), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(denoise(base, x, 700, cond), want)  # the adapter matters


def test_lora_file_without_metadata_is_refused(make_pixart, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        load_lora_weights(make_pixart(), tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora_rank=-1), "model.lora_rank"),
        (dict(lora_rank=4, freeze=("caption_projection",)), "model.freeze"),
        (dict(lora_rank=4, lora_target_modules=()), "model.lora_target_modules"),
        (dict(lora_rank=4, lora_dropout=1.0), "model.lora_dropout"),
        (dict(lora_rank=4, lora_alpha=0.0), "model.lora_alpha"),
        (dict(lora_merge_on_export=True), "model.lora_merge_on_export"),
        (dict(lora_alpha=8.0), "model.lora_alpha"),
    ],
)
def test_config_rejects_lora_combinations_that_mean_nothing(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_targets_that_match_nothing_are_named(make_pixart) -> None:
    config = ModelConfig(lora_rank=2, lora_target_modules=("to_qq",))
    with pytest.raises(ValueError, match=r"model.lora_target_modules=\[.to_qq.\] match no module"):
        add_lora(make_pixart(), config, NUM_STEPS)


def test_fused_kernels_run_the_adapters_and_refuse_an_adapted_timestep_embedding() -> None:
    """The fused attention calls to_q / to_k / to_v / to_out as modules (the adapters act);
    the fused timestep embedding reads its weights directly, so adapting it is refused."""
    from e2ed2.engine.core.models import build_denoiser

    def fused(**lora: object) -> torch.nn.Module:
        config = ModelConfig(
            num_layers=1, num_attention_heads=2, attention_head_dim=8, fused_kernels=True, **lora
        )
        model = build_denoiser(config, latent_channels=4, latent_size=8, text_dim=24)
        return add_lora(model, config, NUM_STEPS)

    with pytest.raises(ValueError, match="fused_kernels"):
        fused(lora_rank=2, lora_target_modules=("linear_1",))
    module = fused(lora_rank=2, lora_target_modules=("to_q", "to_v"))
    from e2ed2.engine.core.network import Conditioning

    cond = Conditioning(torch.randn(BATCH, 7, 24))
    x = torch.randn(LATENT)
    with torch.no_grad():
        before = denoise(module, x, 500, cond)
        _randomize_adapters(module)
        assert not torch.allclose(denoise(module, x, 500, cond), before)
