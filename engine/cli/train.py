"""Training entry point: ``e2ed2 train`` and ``deepspeed --module e2ed2.engine.cli.train``.

    e2ed2 train [--config PRESET.toml] [--dry-run] [section.key=value ...]
    deepspeed --num_gpus 8 --module e2ed2.engine.cli.train --config configs/pixart_alpha_512.toml

Thin on purpose: it resolves the config (failing before any model is built), then hands over to
the :class:`~e2ed2.engine.train.trainer.Trainer`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..config import ConfigError, config_to_toml, load_config
from ..core.loss_terms import total_key
from ..train.distributed import lost_peer
from ..train.dry_run import dry_run_estimate, dry_run_forward
from ..train.launch import check_launch
from ..train.run_lock import FolderInUseError, lock_folder
from .boundary import run_command

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "e2ed2 train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a diffusion transformer end to end through its K-step sampler.",
    )
    parser.add_argument(
        "--config",
        default="embedded",
        help="a TOML preset file or a shipped preset name (default: embedded, the main job)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config as TOML, check its DeepSpeed JSON and local paths, exit",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (also: E2ED2_DEBUG=1)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="overrides on top of the preset, e.g. run.max_steps=50 trajectory.checkpoint=block",
    )
    # Set by the deepspeed launcher; the rank is read from the environment.
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "e2ed2 train") -> int:
    """``e2ed2 train``: exit 0 done, 2 bad input, 1 stopped, 130/143 signals (cli/boundary.py)."""
    return run_command(prog, lambda args: _main(args, prog), argv)


def _main(argv: Sequence[str], prog: str) -> int:
    # Intermixed: the deepspeed launcher puts --local_rank wherever it likes among the overrides.
    args = build_parser(prog).parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(config_to_toml(config), end="")
    try:
        # The launcher sets WORLD_SIZE before this process starts: the DeepSpeed JSON and the
        # local weight paths are checked here, in the first second, not after the models load
        # (a dry run prints the config first, so it can be read on a machine without weights).
        check_launch(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        # One fake-tensor forward of the denoiser (and decode) on the data's first batch:
        # catches what only the first step would (missing PixArt-MS size conditions, dtypes).
        try:
            print(dry_run_forward(config))
        except Exception as err:  # any failure here is what step 1 would raise
            print(
                f"{prog}: config error: dry run: the first training step would fail: "
                f"{type(err).__name__}: {err}",
                file=sys.stderr,
            )
            return 2
        # The whole step's memory per rank (train/step_estimate.py); with run.device_memory_gib
        # a peak over 92% of it is refused here, before any weight is downloaded or read.
        table, refusal = dry_run_estimate(config, int(os.environ.get("WORLD_SIZE", "1")))
        print(table)
        if refusal is not None:
            print(f"{prog}: config error: {refusal}", file=sys.stderr)
            return 2
        return 0

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )

    try:
        # One writer per run folder: rank 0 holds its lock from before the first write to the
        # end (the OS drops it when the process dies); a second run is refused here.
        lock = lock_folder(config.run.output_dir, "run.output_dir", prog) if rank == 0 else None
    except FolderInUseError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        return _train(config, prog, rank)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig, prog: str, rank: int) -> int:
    # lazy: train.trainer imports deepspeed (~0.6 s and its accelerator log line); config,
    # launch and folder errors are reported before it
    from ..train.trainer import CheckpointMismatchError, DataError, NonFiniteError, Trainer

    try:
        trainer = Trainer(config)
        history = trainer.train()
    except (ConfigError, CheckpointMismatchError) as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, NonFiniteError) as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 1
    except FolderInUseError as err:  # the folder re-created while run.overwrite moved it
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 or not lost_peer(err):
            raise
        # Not this rank's fault: a peer ended (its own line names it and why) or hangs.
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(
            f"{prog}: stopped: rank {rank}: another rank is gone, a collective failed "
            f"({first_line})",
            file=sys.stderr,
        )
        return 1
    if rank == 0 and history:
        first, last = history[0], history[-1]
        key = total_key(config.objective.kind)
        print(
            f"done: {trainer.step} steps; loss {first.get(key, float('nan')):.4f} (step "
            f"{first['step']}) -> {last.get(key, float('nan')):.4f} (step {last['step']}); "
            f"outputs in {config.run.output_dir}"
        )
    if rank == 0 and config.run.compare_with_base and config.run.export_at_end:
        # After training, not inside it: the comparison is an evaluation (eval/report.py).
        # lazy: eval.report adds ~0.3 s to every start; only this comparison needs it
        from ..eval.report import compare_with_base, format_report

        print("comparing the export with its pretrained base (K = 1, 2, 4, 3 seeds)...")
        out = config.run.output_dir
        report = compare_with_base(config, os.path.join(out, "export"), out)
        print(f"side-by-side samples: {report['grid']}")
        print(format_report(report))
    return 0


if __name__ == "__main__":
    # The deepspeed launcher's entry (`--module e2ed2.engine.cli.train`): see exit_process.
    from ..train.distributed import exit_process

    exit_process(main())
