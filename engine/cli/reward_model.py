"""``e2ed2 reward-model OUT.safetensors``: fit the digit reward model (objectives/reward.py).

Also ``python -m e2ed2.engine.cli.reward_model OUT.safetensors``. Fits on the digits *train*
split (the held-out split stays for evaluation), prints the held-out accuracy, writes the file
that ``objective.reward_path`` names.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from ..config.data import DataConfig
from ..data.digits import DigitsDataset
from ..objectives.reward import digit_log_prob_reward, fit_digit_reward, save_reward_model
from .args import int_at_least
from .boundary import run_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 reward-model OUT.safetensors [--seed S] [--resolution R] [--epochs N]``."""
    return run_command("e2ed2 reward-model", _main, argv)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="e2ed2 reward-model",
        description="Fit the prompted-digit reward classifier (objective.reward_path) on the "
        "digits train split; not the evaluator's network (another architecture and seed).",
    )
    parser.add_argument("out", help="safetensors file to write")
    parser.add_argument(
        "--seed", type=int_at_least(0), default=1, help="the evaluator's classifier uses 0"
    )
    parser.add_argument(
        "--resolution", type=int_at_least(8), default=DataConfig.resolution, help="data side"
    )
    parser.add_argument("--data-seed", type=int_at_least(0), default=DataConfig.seed)
    parser.add_argument("--epochs", type=int_at_least(1), default=30)
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    # Checked before the fit, which takes a minute: a bad path should not cost it.
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"the folder of {args.out!r} does not exist")
    # The MLP's matmuls are too small for intra-op threads to pay off; on a shared CPU extra
    # threads only contend (measured: 4.5 min with 2 threads vs 1 min with 1 under load 12).
    torch.set_num_threads(args.threads)
    data = DataConfig(resolution=args.resolution, seed=args.data_seed)
    train = DigitsDataset(data, "train")
    model = fit_digit_reward(train.images, train.labels, args.seed, epochs=args.epochs)
    holdout = DigitsDataset(data, "holdout")
    with torch.no_grad():
        accuracy = float((model(holdout.images).argmax(1) == holdout.labels).float().mean())
        reward = float(digit_log_prob_reward(model, holdout.images, holdout.labels).mean())
    save_reward_model(model, args.out)
    print(
        f"wrote {args.out}: held-out accuracy {accuracy:.3f}, mean log p(prompted digit) "
        f"{reward:.3f} ({len(holdout)} images, {args.resolution} px)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
