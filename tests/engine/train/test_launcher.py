"""The real `deepspeed` launcher on 2 CPU ranks (gloo): ZeRO-3 training, resume, and correctness.

These start separate processes (the first start JIT-builds DeepSpeed's small shm op, ~1 min);
they are the only tests that exercise multi-rank ZeRO-3.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e2ed2.engine.train.distributed import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Small and fast: 2 transformer blocks, 16x16 digits, batch 2 per rank.
TINY = [
    "--config",
    "scratch",
    "model.num_layers=2",
    "run.batch_per_rank=2",
    "run.log_every_steps=1",
    "run.sample_every_steps=1000",
    "run.num_sample_images=4",
    "trajectory.num_steps=4",
    "trajectory.checkpoint=step",
]


def deepspeed_train(
    run: Callable[..., str], output_dir: Path, *overrides: str, ranks: int = 2
) -> str:
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "e2ed2.engine.cli.train",
        f"run.output_dir={output_dir}",
        *TINY,
        *overrides,
    ]
    return run(cmd)


def single_process_train(run: Callable[..., str], output_dir: Path, *overrides: str) -> str:
    cmd = [str(BIN / "e2ed2"), "train", f"run.output_dir={output_dir}", *TINY, *overrides]
    return run(cmd)


def _metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_zero3_gan_run_resumes_and_continues_identically(
    tmp_path: Path, run_checked: Callable[..., str], zero3_partition_everything: str
) -> None:
    """ZeRO-3, K=4, `step` checkpointing, a frozen submodule and the GAN term, on 2 ranks.

    Run 3 steps, resume the same command to 5; compare with an uninterrupted 5-step run.
    """
    common = (
        f"run.deepspeed_config={zero3_partition_everything}",
        'model.freeze=["caption_projection"]',
        "gan.enabled=true",
        "gan.base_channels=8",
        "run.checkpoint_every_steps=2",
    )
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    deepspeed_train(run_checked, resumed, *common, "run.max_steps=3")
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == [
        "step00000002",
        "step00000003",
    ]
    out = deepspeed_train(run_checked, resumed, *common, "run.max_steps=5")
    assert "resumed from" in out and "at step 3" in out
    deepspeed_train(run_checked, straight, *common, "run.max_steps=5")

    got, ref = _metrics(resumed), _metrics(straight)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        for term in ("l2", "gan_generator", "gan_discriminator", "total"):
            assert got[step][term] == pytest.approx(ref[step][term], rel=1e-5), (step, term)
    # Outputs a user expects: TensorBoard events, a sample grid, a diffusers export.
    assert list((resumed / "tensorboard").glob("events.out.tfevents.*"))
    assert (resumed / "samples" / "step00000005.png").is_file()
    assert (resumed / "export" / "transformer" / "config.json").is_file()
    # The frozen submodule did not move, the rest did.
    from diffusers import PixArtTransformer2DModel

    first = PixArtTransformer2DModel.from_pretrained(
        resumed / "checkpoints" / "step00000004" / "export" / "transformer"
    )
    last = PixArtTransformer2DModel.from_pretrained(resumed / "export" / "transformer")
    frozen = dict(first.caption_projection.named_parameters())
    for name, param in last.caption_projection.named_parameters():
        torch.testing.assert_close(param, frozen[name], rtol=0, atol=0)
    assert not torch.equal(first.proj_out.weight, last.proj_out.weight)


def _trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed checkpoint (ZeRO-3 shards are consolidated)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=checkpoint.name)


def test_zero3_two_ranks_match_single_process_without_zero(
    tmp_path: Path, run_checked: Callable[..., str], zero3_partition_everything: str
) -> None:
    """After 3 steps, weights and EMA of 2-rank ZeRO-3 (batch 2 each) equal 1 rank, batch 4.

    The ZeRO-3 run also has the fused kernels installed (torch backend on CPU): the fused
    timestep embedding reads its Linear weights outside their modules and is called K times per
    iteration, which ZeRO-3 must gather and reduce correctly (a ZeRO-3 leaf module would not).
    """
    zero3, single = tmp_path / "zero3", tmp_path / "single"
    common = ("run.max_steps=3", "run.checkpoint_every_steps=3", "optim.lr=1e-3")
    deepspeed_train(
        run_checked,
        zero3,
        *common,
        f"run.deepspeed_config={zero3_partition_everything}",
        "model.fused_kernels=true",
    )
    single_process_train(
        run_checked, single, *common, "run.deepspeed_config=zero2", "run.batch_per_rank=4"
    )

    got = _trained_weights(zero3 / "checkpoints" / "step00000003")
    ref = _trained_weights(single / "checkpoints" / "step00000003")
    assert got.keys() == ref.keys()
    worst = max(
        ((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)).item() for k in ref
    )
    assert worst <= 1e-4, f"max relative weight difference ZeRO-3 vs single: {worst:.2e}"

    ema_got = load_file(zero3 / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema_ref = load_file(single / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    worst_ema = max(
        ((ema_got[k] - ema_ref[k]).abs().max() / ema_ref[k].abs().max().clamp_min(1e-12)).item()
        for k in ema_ref
    )
    assert worst_ema <= 1e-4, f"max relative EMA difference: {worst_ema:.2e}"
    # Not vacuous: the weights moved (the EMA, decay 0.95, lags behind moving weights).
    lag = max((got[k] - ema_got[k]).abs().max().item() for k in ema_got)
    assert lag > 1e-5, f"trained weights equal their EMA (max diff {lag:.2e}): nothing trained"
    print(f"ZeRO-3 vs single: weights {worst:.2e}, EMA {worst_ema:.2e}, EMA lag {lag:.2e}")
    # The runs trained: the loss of the last step differs from the first in both, identically.
    m_got, m_ref = _metrics(zero3), _metrics(single)
    for step in (1, 2, 3):
        assert m_got[step]["total"] == pytest.approx(m_ref[step]["total"], rel=1e-5)


_POLICY_GRADS_SCRIPT = """
import dataclasses, json, sys
import torch
from deepspeed.utils import safe_get_full_grad
from e2ed2.engine.config import load_config
from e2ed2.engine.core.step_cuts import CutUnroll
from e2ed2.engine.core.trajectory import Trajectory
from e2ed2.engine.train.distributed import exit_process
from e2ed2.engine.train.step_backward import backward_in_pieces
from e2ed2.engine.train.trainer import Trainer

out, tiny, zero3 = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
trainer = Trainer(load_config("scratch", [*json.loads(tiny), f"run.output_dir={out}/run",
                                          f"run.deepspeed_config={zero3}"]))
latents, cond, _ = trainer._batch_to_device(next(iter(trainer.loader)))
plan = trainer.trajectory.plan(torch.Generator().manual_seed(0))
start, noises = trainer._start_and_noise(trainer.trajectory, plan, latents, 0)
grads = {}
# block_offload, then block_offload with the backward one sampler step per ZeRO micro-step.
for policy, per_step in (("none", False), ("block_offload", False), ("block_offload", True)):
    config = dataclasses.replace(trainer.config.trajectory, checkpoint=policy)
    trajectory, unroll = Trajectory(config, trainer.schedule), CutUnroll(per_step=True)
    if per_step:
        sample = unroll.run(trajectory, trainer.engine, cond, start, noises, plan)
    else:
        sample = trajectory.run(trainer.engine, cond, start, noises, plan)
    loss = (sample - latents).square().mean()
    if per_step:
        backward_in_pieces(trainer.engine, unroll, loss, last_micro_batch=True)
    else:
        trainer.engine.backward(loss)
    grads[policy, per_step] = {n: safe_get_full_grad(p).clone()
                               for n, p in trainer.engine.module.named_parameters()}
    trainer.engine.optimizer.zero_grad(set_to_none=True)
ref = grads["none", False]
worst = {str(per_step): max(((grads["block_offload", per_step][n] - g).abs().max()
                             / g.abs().max().clamp_min(1e-30)).item() for n, g in ref.items())
         for per_step in (False, True)}
with open(f"{out}/rank{trainer.rank}.json", "w") as f:
    json.dump({"worst": worst,
               "zero_grads": [n for n, g in ref.items() if not g.abs().sum() > 0],
               "partitioned": all(p.ds_tensor.numel() < p.ds_numel
                                  for p in trainer.engine.module.parameters() if p.ds_numel > 1)},
              f)
exit_process(0)
"""


def test_block_offload_gradients_equal_plain_autograd_under_zero3(
    tmp_path: Path,
    run_checked: Callable[..., str],
    deepspeed_command: Callable[..., list[str]],
    zero3_partition_everything: str,
) -> None:
    """2 ranks, ZeRO-3 with every parameter partitioned: the gathered gradients of one
    backward under `block_offload` equal those under `none` (same batch, noise and plan), and
    so do those of `block_offload` backpropagated one sampler step per ZeRO micro-step
    (trajectory.per_step_backward: K reduce-scatters into the partitions, no gradient sum)."""
    script = tmp_path / "policy_grads.py"
    script.write_text(_POLICY_GRADS_SCRIPT)
    run_checked(
        deepspeed_command(
            str(script),
            str(tmp_path),
            json.dumps(TINY[2:]),
            zero3_partition_everything,
        )
    )
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["partitioned"], "ZeRO-3 kept whole parameters: nothing was partitioned"
        assert result["zero_grads"] == [], f"parameters with zero gradient: {result['zero_grads']}"
        for per_step, worst in result["worst"].items():
            assert worst <= 1e-5, f"rank {rank}, per step {per_step}: relative error {worst}"
