"""``e2ed2 estimate``: the whole training step's memory per rank, before launch, without weights.

    e2ed2 estimate --config PRESET [--world-size N] [--device-memory-gib G] [--resolution PX]
                   [--json OUT] [section.key=value ...]

Reads the resolved config and the ``config.json`` files it names (no weights, no data needed),
runs one step under fake tensors (train/step_estimate.py) and prints one labelled line per term
and the peak over the step's phases. With a device memory (``--device-memory-gib`` or
``run.device_memory_gib``) a peak above 92% of it exits 2, naming the largest terms and the keys
that cut them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..config import ConfigError, load_config
from .args import int_at_least
from .boundary import run_command

__all__ = ["build_parser", "main"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser(prog: str = "e2ed2 estimate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Estimate the whole training step's device and host memory per rank "
        "(fake tensors: no weights are read, nothing is allocated).",
    )
    parser.add_argument("--config", default="embedded", help="a TOML preset or a preset name")
    parser.add_argument(
        "--world-size", type=int_at_least(1), default=1, help="ranks (GPUs) of the run"
    )
    parser.add_argument(
        "--device-memory-gib",
        type=_positive_float,
        default=None,
        help="one accelerator's memory in GiB (default: run.device_memory_gib); a peak above "
        "92%% of it exits 2",
    )
    parser.add_argument(
        "--resolution",
        type=int_at_least(8),
        default=None,
        help="image side in pixels (default: the data's largest bucket, else the model's size)",
    )
    parser.add_argument("--json", default=None, help="also write the estimate to this JSON file")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "e2ed2 estimate") -> int:
    return run_command(prog, lambda args: _main(args, prog), argv)


def _main(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    # lazy: pulls in torch (~4 s); --help and config errors return before it
    from ..train.step_estimate import check_fits, estimate_step, format_estimate

    try:
        estimate = estimate_step(config, world_size=args.world_size, resolution_px=args.resolution)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: config error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_estimate(estimate))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(estimate.as_dict(), handle, indent=2)
    gib = args.device_memory_gib or config.run.device_memory_gib
    if gib is not None:
        refusal = check_fits(estimate, gib)
        if refusal is not None:
            print(f"{prog}: config error: {refusal}", file=sys.stderr)
            return 2
        print(f"fits: {estimate.peak_device_bytes / 2**30:.2f} GiB <= 92% of {gib:g} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
