"""The ``e2ed2`` command: ``train``, ``precompute``, ``sample``, ``evaluate``, ``reward-model``,
``null-condition``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

_USAGE = """usage: e2ed2 <command> [args]

commands:
  train       train (end to end through the K-step sampler); `e2ed2 train --help`
  launch      train on the GPUs of one node under the deepspeed launcher, with SIGTERM / SIGINT
              forwarded to every rank: `e2ed2 launch --num_gpus 8 -- [train args]`
  estimate    the whole training step's memory per rank, from config.json files (no weights)
  precompute  encode an image folder with captions into latent shards (local VAE + T5)
  encode-prompts  encode a prompt file into a prompt-only data folder (data.source="prompts")
  sample      write a PNG grid of K-step samples from an export or checkpoint
  evaluate    score an export's samples at several K (digits: classifier FD and accuracy)
  reward-model  fit the digit reward classifier for objective.reward_path (OUT.safetensors)
  null-condition  add the empty prompt's encoding (classifier-free guidance) to a shard folder

exit codes: 0 done, 2 bad input (nothing changed), 1 stopped (bad data, NaN steps, full disk,
or a bug), 130 / 143 SIGINT / SIGTERM; --debug (or E2ED2_DEBUG=1) prints tracebacks
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":  # `e2ed2 --debug train ...`: the command reads it
        argv = [*argv[1:2], "--debug", *argv[2:]]
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .train import main as train_main

        return train_main(rest)
    if command == "launch":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .launch import main as launch_main

        return launch_main(rest)
    if command == "estimate":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .estimate import main as estimate_main

        return estimate_main(rest)
    if command == "encode-prompts":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .encode_prompts import main as encode_prompts_main

        return encode_prompts_main(rest)
    if command == "precompute":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .precompute import main as precompute_main

        return precompute_main(rest)
    if command == "sample":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .sample import main as sample_main

        return sample_main(rest)
    if command == "evaluate":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "null-condition":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .null_condition import main as null_condition_main

        return null_condition_main(rest)
    if command == "reward-model":
        # lazy: each command imports only its own module (`e2ed2 --help` stays ~0.05 s)
        from .reward_model import main as reward_model_main

        return reward_model_main(rest)
    print(f"e2ed2: unknown command {command!r}\n{_USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
