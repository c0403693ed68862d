"""``e2ed2 launch``: ``deepspeed --module e2ed2.engine.cli.train`` with preemption done right.

    e2ed2 launch [deepspeed launcher args] -- [e2ed2 train args]
    e2ed2 launch --num_gpus 8 -- --config pixart_alpha_512 run.output_dir=runs/px512

Runs the real ``deepspeed`` launcher with the given arguments and ``--module
e2ed2.engine.cli.train`` plus the train arguments, and forwards SIGTERM / SIGINT to every rank
(each checkpoints and exits 143 / 130); a failed rank is named and the others stopped (see
train/supervise.py for what DeepSpeed's own launcher does and does not).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ..train.supervise import supervise

__all__ = ["main"]

_USAGE = """usage: e2ed2 launch [deepspeed launcher args] -- [e2ed2 train args]

Runs `deepspeed [launcher args] --module e2ed2.engine.cli.train [train args]` and forwards
SIGTERM / SIGINT to every rank (checkpoint, exit 143 / 130); a failed rank is named and the
others are stopped. Example: e2ed2 launch --num_gpus 8 -- --config pixart_alpha_512
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_USAGE, end="")
        return 0
    if "--" not in argv:
        print(
            f"e2ed2 launch: error: no `--` between the launcher's and train's arguments\n{_USAGE}",
            file=sys.stderr,
            end="",
        )
        return 2
    split = argv.index("--")
    launcher_args, train_args = argv[:split], argv[split + 1 :]
    for taken in ("--module", "-m", "--no_python", "--no_local_rank"):
        if taken in launcher_args:
            print(
                f"e2ed2 launch: error: {taken} is set by e2ed2 launch; remove it", file=sys.stderr
            )
            return 2
    # The one beside this Python first (a venv that is not activated), then PATH's.
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    deepspeed = deepspeed or shutil.which("deepspeed")
    if deepspeed is None:
        print("e2ed2 launch: error: no `deepspeed` command on PATH", file=sys.stderr)
        return 2

    command = [deepspeed, *launcher_args, "--module", "e2ed2.engine.cli.train", *train_args]
    return supervise(command)


if __name__ == "__main__":
    sys.exit(main())
