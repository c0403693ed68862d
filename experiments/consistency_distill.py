"""Latent consistency distillation (LCD; Luo et al. 2023, Alg. 1) of the shipped digits base: the
baseline issue 25 compares the main job with, at equal optimizer steps and at equal compute.

As the LCM paper defines it (and diffusers' ``train_lcm_distill_*`` scripts run it), written here
against the engine's own pieces (data, conditioning, ``denoise``, the LCM scheduler's constants,
the export) because those scripts are SD / SDXL programs (VAE, text encoders, accelerate) that
cannot load this pixel-space PixArt base:

- **Skipped DDIM solver**: a grid of N = 50 DDIM timesteps (``original_inference_steps``, the one
  LCM samples from): t_n = 20 n - 1; one training pair is (t_n, t_{n-1}) with a skip of k = 20
  discrete steps. The frozen base (the teacher) moves x_{t_n} to x_{t_{n-1}} by one deterministic
  DDIM step.
- **Boundary conditions**: f(x, t) = c_skip(t) x + c_out(t) x0(x, t), diffusers' LCM scalings
  (sigma_data 0.5, timestep_scaling 10), so f(x, 0) = x.
- **EMA target network** (decay 0.95, diffusers' default): target = f_target(x_{t_{n-1}}, t_{n-1}),
  no gradient; the student f(x_{t_n}, t_n) is pulled to it by the **pseudo-Huber loss**
  sqrt(d^2 + c^2) - c with c = 0.001.
- No classifier-free guidance (the base has no guidance embedding and is sampled with w = 1, as
  the main job's teacher is).
- **Sampling**: LCM's multistep sampler (the engine's ``sampler.kind = "lcm"``, which evaluates at
  t = 999 / 759 / 499 / 259 for K = 4 on this 50-step grid); the export is the EMA target network.

Same budget rule as the main job: batch 8, AdamW LR 3e-4 (weight decay 0), the embedded digits
data and captions, one CPU thread. ``--steps`` optimizer steps.

    python experiments/consistency_distill.py --out experiments/runs/few_step/cd --steps 300
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from e2ed2.engine.config import load_config
from e2ed2.engine.core.models import build_denoiser
from e2ed2.engine.core.network import denoise
from e2ed2.engine.data import batch_conditioning, build_dataloader
from e2ed2.engine.train.export import write_export

DDIM_TIMESTEPS = 50  # LCM's N; the engine's LCM sampler uses original_inference_steps = 50
HUBER_C = 0.001
TARGET_EMA = 0.95


class ConsistencyDistiller:
    """One LCD step at a time; ``student`` trains, ``target`` is its EMA, ``teacher`` frozen."""

    def __init__(self, base: torch.nn.Module, sampler_config, *, lr: float) -> None:
        self.student = base.train()
        self.target = copy.deepcopy(base).requires_grad_(False).eval()
        self.teacher = copy.deepcopy(base).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=0.0)
        scheduler = sampler_config.to_diffusers()  # LCMScheduler: alphas and boundary scalings
        self.alphas = scheduler.alphas_cumprod.float()
        self.num_train = sampler_config.num_train_timesteps
        self.skip = self.num_train // DDIM_TIMESTEPS
        # t_n = skip * n - 1, n = 1..N (diffusers' DDIMSolver grid).
        self.grid = torch.arange(1, DDIM_TIMESTEPS + 1) * self.skip - 1
        scalings = [
            scheduler.get_scalings_for_boundary_condition_discrete(int(t))
            for t in range(self.num_train)
        ]
        self.c_skip = torch.tensor([float(s) for s, _ in scalings])
        self.c_out = torch.tensor([float(o) for _, o in scalings])
        self.prediction = sampler_config.prediction_type

    def _x0_and_eps(self, output, x, t):
        a = self.alphas[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - self.alphas[t]).sqrt().view(-1, 1, 1, 1)
        if self.prediction == "v_prediction":
            return a * x - b * output, a * output + b * x
        if self.prediction == "epsilon":
            return (x - b * output) / a, output
        return output, (x - a * output) / b

    def _consistency(self, network, x, t, cond):
        """f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (the boundary-conditioned x0)."""
        x0, _ = self._x0_and_eps(denoise(network, x, t, cond), x, t)
        view = (-1, 1, 1, 1)
        return self.c_skip[t].view(view) * x + self.c_out[t].view(view) * x0

    @torch.no_grad()
    def ddim_solve(self, x_t, t, t_prev, cond):
        """The skipped DDIM solver: one deterministic (eta 0) step of the frozen teacher from
        x_{t_n} to t_{n-1} (per-sample timesteps, (B,) tensors)."""
        x0, eps = self._x0_and_eps(denoise(self.teacher, x_t, t, cond), x_t, t)
        a_prev = self.alphas[t_prev].sqrt().view(-1, 1, 1, 1)
        b_prev = (1 - self.alphas[t_prev]).sqrt().view(-1, 1, 1, 1)
        return a_prev * x0 + b_prev * eps

    def step(self, clean: torch.Tensor, cond, g: torch.Generator) -> float:
        batch = clean.shape[0]
        index = torch.randint(0, DDIM_TIMESTEPS, (batch,), generator=g)
        t = self.grid[index]
        t_prev = (t - self.skip).clamp_min(0)  # n = 1 moves to t = 0 (c_skip(0) ~ 1)
        noise = torch.randn(clean.shape, generator=g)
        a = self.alphas[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - self.alphas[t]).sqrt().view(-1, 1, 1, 1)
        x_t = a * clean + b * noise
        prediction = self._consistency(self.student, x_t, t, cond)
        with torch.no_grad():
            x_prev = self.ddim_solve(x_t, t, t_prev, cond)
            target = self._consistency(self.target, x_prev, t_prev, cond)
        diff = (prediction.float() - target.float()) ** 2
        loss = (torch.sqrt(diff + HUBER_C**2) - HUBER_C).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for p_t, p_s in zip(self.target.parameters(), self.student.parameters(), strict=True):
                p_t.lerp_(p_s, 1 - TARGET_EMA)
        return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--export-at",
        type=int,
        nargs="*",
        default=[],
        help="also export the target network after these steps (OUT/export_stepN): one run "
        "gives several budgets, identical to shorter runs (constant LR, same seed)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = load_config("embedded", ["sampler.kind=lcm", f"run.seed={args.seed}"])
    loader, _ = build_dataloader(config.data, args.batch)
    dataset = loader.dataset
    channels, size = dataset.latent_shape[0], dataset.base_latent_size
    base = build_denoiser(
        config.model, latent_channels=channels, latent_size=size, text_dim=dataset.text_shape[1]
    )
    distiller = ConsistencyDistiller(base, config.sampler, lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    batches = iter(loader)
    log, cpu0 = [], time.process_time()
    for step in range(1, args.steps + 1):
        batch = next(batches)
        loss = distiller.step(batch.latents.float(), batch_conditioning(batch), g)
        if not math.isfinite(loss):
            raise SystemExit(f"step {step}: non-finite loss {loss}")
        if step % 50 == 0 or step == args.steps or step in args.export_at:
            log.append({"step": step, "loss": loss, "cpu_s": time.process_time() - cpu0})
            print(json.dumps(log[-1]), flush=True)
        if step in args.export_at and step != args.steps:
            started, target = time.process_time(), distiller.target
            write_export(args.out / f"export_step{step}", config, target, target.state_dict())
            cpu0 += time.process_time() - started  # the export is not training
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(log, indent=2) + "\n")
    target = distiller.target
    write_export(args.out / "export", config, target, target.state_dict())


if __name__ == "__main__":
    main()
