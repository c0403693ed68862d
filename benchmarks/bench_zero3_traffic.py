"""ZeRO-3 all-gather / reduce-scatter bytes per iteration vs K (issue 5, question 4).

Question: how many bytes does ZeRO-3 move per E2ED2 iteration (K forwards, K recomputes, K
backwards through one shared denoiser), for the shipped ``ds_configs``, and does gathering the
parameters once per iteration (``engine.zero_reuse.gathered_once``, switched on by
``run.zero3_gather_once``) bring all-gather bytes down to ~1x the parameter bytes without
changing the gradients? And what does the per-step backward (``trajectory.per_step_backward``:
one ZeRO micro-step per sampler step, no gradient sum across the steps) cost in reduce-scatter
bytes?

Runs the real ``deepspeed`` launcher on 2 CPU ranks (gloo) with DeepSpeed's comms logger
(``comms_logger.prof_all``); per config and K: two warm-up iterations (ZeRO-3 records its
module trace), then one logged iteration. Bytes are summed from ``comms_logger.comms_dict``
(message size x count; DeepSpeed logs an all-gather's input shard, so gathered bytes are
that times the world size). Parameter bytes: all parameters, fp32. After the logged
iteration rank 0 saves the full weights, so the configs' updates can be compared.

    python benchmarks/bench_zero3_traffic.py            # results/zero3_traffic.{json,png}
    python benchmarks/bench_zero3_traffic.py --smoke
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Recipe name -> (shipped DeepSpeed JSON, run.zero3_gather_once, trajectory.per_step_backward).
RECIPES = {
    "zero3": ("zero3", False, False),
    "zero3_reuse": ("zero3", True, False),
    "zero3_per_step": ("zero3", False, True),
    "zero3_reuse_per_step": ("zero3", True, True),
}
CONFIGS = tuple(RECIPES)
NUM_STEPS = (1, 2, 4, 8)
WORLD_SIZE = 2


# -- worker: runs under the deepspeed launcher ------------------------------------------------
def _iteration(
    engine, trajectory, clean, cond, gather_once: bool, per_step: bool, seed: int, before_step=None
) -> None:
    """Forward through K steps, backward (one ZeRO micro-step per sampler step with
    ``per_step``), ``before_step()``, optimizer step (the same noise every call)."""
    import torch

    from e2ed2.engine.core.step_cuts import CutUnroll
    from e2ed2.engine.train.gather_once import gathered_once
    from e2ed2.engine.train.step_backward import backward_in_pieces

    with gathered_once(engine.module, enabled=gather_once):
        generator = torch.Generator().manual_seed(seed)
        plan = trajectory.plan()
        start, noises = trajectory.draw_noise(plan, clean.shape, clean=clean, generator=generator)
        unroll = CutUnroll(per_step=True) if per_step else None
        if unroll is None:
            sample = trajectory.run(engine, cond, start, noises, plan)
        else:
            sample = unroll.run(trajectory, engine, cond, start, noises, plan)
        loss = (sample - clean).square().mean()
        if unroll is None:
            engine.backward(loss)
        else:
            backward_in_pieces(engine, unroll, loss, last_micro_batch=True)
    if before_step is not None:
        before_step()
    engine.step()


def _read_full_grads(engine, into: dict) -> None:
    """Every parameter's full gradient (a collective under ZeRO-3: all ranks call it)."""
    from deepspeed.utils import safe_get_full_grad

    for name, param in engine.module.named_parameters():
        into[name] = safe_get_full_grad(param).detach().clone()


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    from e2ed2.engine.config.optim import OptimConfig
    from e2ed2.engine.core.estimate import DenoiserShape, build_pixart, make_inputs, make_trajectory
    from e2ed2.engine.train.distributed import build_ds_config, init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed()
    shape = DenoiserShape(
        num_layers=args.layers,
        # hidden 384: every weight matrix is above the shipped persistence threshold (1e5
        # elements), so ZeRO-3 partitions it (only biases and norms stay whole on each rank).
        num_attention_heads=6,
        attention_head_dim=64,
        caption_channels=384,
        text_tokens=16,
    )
    results = []
    for ds_config, k in itertools.product(args.ds_configs, args.num_steps):
        ds_name, gather_once, per_step = RECIPES[ds_config]
        config = build_ds_config(
            ds_name,
            batch_per_rank=1,
            grad_accum_steps=1,
            world_size=world,
            optim=OptimConfig(lr=1e-3, grad_clip=0.0),
            precision="fp32",
        )
        config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
        model = build_pixart(shape, args.latent, seed=0)
        with torch.no_grad():  # diffusers zero-inits adaLN / output: make every grad non-zero
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=list(model.parameters()), config=config
        )
        trajectory = make_trajectory("step", k)
        clean, cond = make_inputs(shape, args.latent, 1, torch.float32)

        iteration = (engine, trajectory, clean, cond, gather_once, per_step, 7 + rank)
        for _ in range(2):
            _iteration(*iteration)
        deepspeed.comm.comms_logger.reset_data()
        _iteration(*iteration)
        comms = deepspeed.comm.comms_logger.comms_dict
        bytes_by_op = {
            op: sum(size * record[0] for size, record in sizes.items())
            for op, sizes in comms.items()
        }
        calls_by_op = {
            op: sum(record[0] for record in sizes.values()) for op, sizes in comms.items()
        }
        partitioned = sum(
            p.ds_numel * p.element_size() for p in engine.module.parameters() if not p.ds_persist
        )
        weights = {}
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            if rank == 0:
                weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        # A fourth iteration's gradients, gathered before its optimizer step (collective).
        grads: dict = {}
        _iteration(*iteration, before_step=functools.partial(_read_full_grads, engine, grads))
        if rank == 0:
            torch.save(weights, Path(args.out) / f"weights_{ds_config}_K{k}.pt")
            torch.save(grads, Path(args.out) / f"grads_{ds_config}_K{k}.pt")
            results.append(
                {
                    "ds_config": ds_config,
                    "num_steps": k,
                    "param_bytes": param_bytes,
                    "partitioned_param_bytes": partitioned,
                    "bytes_by_op": bytes_by_op,
                    "calls_by_op": calls_by_op,
                }
            )
        del engine
    if rank == 0:
        (Path(args.out) / "traffic.json").write_text(json.dumps(results))


# -- driver ----------------------------------------------------------------------------------
def launch(ds_configs: list[str], args: argparse.Namespace, out: Path) -> list[dict]:
    """One launcher run measuring every config in turn (a fresh engine each): the launcher and
    rank start-up, most of a smoke run's time, is paid once."""
    from e2ed2.engine.train.distributed import free_port

    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(WORLD_SIZE),
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--ds-configs",
        *ds_configs,
        "--out",
        str(out),
        "--layers",
        str(args.layers),
        "--latent",
        str(args.latent),
        "--num-steps",
        *map(str, args.num_steps),
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(ds_configs)}: launcher failed:\n{tail}")
    return json.loads((out / "traffic.json").read_text())


def op_bytes(row: dict, name: str) -> int:
    return sum(v for op, v in row["bytes_by_op"].items() if name in op)


def main(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common

    if args.smoke:
        args.layers, args.latent, args.num_steps = 1, 8, [1, 2]
        # The per-step rows without gathering once suffice (each config builds its own engine).
        args.configs = [c for c in args.configs if c != "zero3_reuse_per_step"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = launch(args.configs, args, out)
        print(f"{', '.join(args.configs)}: done", flush=True)
        # Gradients unchanged: the weights after 3 identical iterations, and the gradients of a
        # fourth, agree across configs. (Weights compare exactly only where the summation order
        # is the same: the attention key biases' gradients are zero in exact arithmetic, and
        # AdamW turns any two orders' rounding noise there into full-size, different updates.
        # Gradients are compared relative to the largest gradient element.)
        weight_diff, grad_diff = {}, {}
        reference = args.configs[0]
        for k in args.num_steps:
            ref = torch.load(out / f"weights_{reference}_K{k}.pt")
            ref_grads = torch.load(out / f"grads_{reference}_K{k}.pt")
            scale = max(g.abs().max() for g in ref_grads.values())
            for ds_config in args.configs[1:]:
                got = torch.load(out / f"weights_{ds_config}_K{k}.pt")
                weight_diff[f"{ds_config}_vs_{reference}_K{k}"] = max(
                    ((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item()
                    for n in ref
                )
                got_grads = torch.load(out / f"grads_{ds_config}_K{k}.pt")
                grad_diff[f"{ds_config}_vs_{reference}_K{k}"] = max(
                    ((got_grads[n] - g).abs().max() / scale).item() for n, g in ref_grads.items()
                )
    for row in rows:
        # DeepSpeed's logger records each call's ``tensor`` argument: for all_gather_into_tensor
        # that is this rank's input shard, so the gathered (output) bytes are world_size times
        # it; for reduce_scatter_tensor it is the full input.
        row["all_gather_logged_input_bytes"] = op_bytes(row, "all_gather") + op_bytes(
            row, "allgather"
        )
        row["all_gather_bytes"] = WORLD_SIZE * row["all_gather_logged_input_bytes"]
        row["reduce_scatter_bytes"] = op_bytes(row, "reduce_scatter")
        row["all_gather_over_param_bytes"] = row["all_gather_bytes"] / row["param_bytes"]
        print(
            f"{row['ds_config']:>12} K={row['num_steps']}: all-gather "
            f"{row['all_gather_over_param_bytes']:.2f}x params, reduce-scatter "
            f"{row['reduce_scatter_bytes'] / row['param_bytes']:.2f}x params"
        )
    payload = {
        "model": {"layers": args.layers, "hidden": 384, "latent": args.latent, "dtype": "fp32"},
        "world_size": WORLD_SIZE,
        "trajectory": "K LCM steps, checkpoint=step, batch 1 per rank",
        "rows": rows,
        "max_relative_weight_difference_after_3_iterations": weight_diff,
        "max_gradient_difference_4th_iteration_over_largest_gradient": grad_diff,
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ds_config in args.configs:
        sub = [r for r in rows if r["ds_config"] == ds_config]
        ks = [r["num_steps"] for r in sub]
        axes[0].plot(ks, [r["all_gather_over_param_bytes"] for r in sub], "o-", label=ds_config)
        axes[1].plot(
            ks, [r["reduce_scatter_bytes"] / r["param_bytes"] for r in sub], "o-", label=ds_config
        )
    axes[0].axhline(3, color="gray", ls="--", label="target 3x")
    for ax, title in zip(
        axes,
        ("all-gather bytes / parameter bytes", "reduce-scatter bytes / parameter bytes"),
        strict=True,
    ):
        ax.set_xlabel("K")
        ax.set_title(title + " per iteration")
        ax.set_xticks(list(args.num_steps))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("ZeRO-3 traffic per iteration, 2 CPU ranks (gloo), DeepSpeed comms logger")
    _common.write_result("zero3_traffic", payload, fig, smoke=args.smoke)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--num-steps", nargs="+", type=int, default=list(NUM_STEPS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ds-configs", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        from e2ed2.engine.train.distributed import exit_process

        worker(arguments)
        exit_process(0)
    main(arguments)
