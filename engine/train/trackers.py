"""Experiment trackers behind one interface: TensorBoard (the default) and Weights & Biases.

``run.report_to`` names the trackers a run logs to. Each one takes the same three calls from
rank 0's :class:`~e2ed2.engine.train.metrics.MetricsLog` (which also writes ``metrics.jsonl``):

    log_scalars({"loss/total": 0.12, ...}, step)
    log_images("validation/K2", [image (H, W, 3) uint8], step, captions=["a cat"])
    close()

No tracker is written by hand: TensorBoard's ``SummaryWriter`` and the ``wandb`` SDK do the file
work; this module only maps the three calls onto them. ``wandb`` is optional (``pip install
e2ed2[wandb]``); :func:`check_trackers` names the key and the pip command at launch when it is
missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from ..config import ConfigError
from ..config.run import TRACKERS

__all__ = [
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "build_trackers",
    "check_trackers",
]

log = logging.getLogger("e2ed2.train")

#: Written into output_dir on a run's first start: a resumed run logs into the same wandb run.
WANDB_ID_FILE = "wandb_run_id.txt"


class Tracker(Protocol):
    """What every tracker does with a run's scalars and images (rank 0 only)."""

    def log_scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def log_images(
        self,
        tag: str,
        images: Sequence[np.ndarray],
        step: int,
        captions: Sequence[str] | None = None,
    ) -> None:
        """``images``: (H, W, 3) uint8 arrays; ``captions``: one per image (or None)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """``output_dir/tensorboard``: scalars, and each image as its own tag (``tag`` for one image,
    ``tag/i`` for several: TensorBoard's image plugin shows one image per tag and step)."""

    def __init__(self, output_dir: Path, *, resume_step: int) -> None:
        # purge_step: events a killed run logged after its last checkpoint (steps > step) are
        # dropped, so the resumed curve has no duplicated or diverging tail.
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_images(
        self,
        tag: str,
        images: Sequence[np.ndarray],
        step: int,
        captions: Sequence[str] | None = None,
    ) -> None:
        for number, image in enumerate(images):
            name = tag if len(images) == 1 else f"{tag}/{number}"
            self.writer.add_image(name, image, step, dataformats="HWC")
        if captions:
            # The image plugin shows no caption: the prompts go beside it as text.
            self.writer.add_text(tag, "\n\n".join(captions), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run per output_dir: the resolved config as its config, scalars and images at
    the trainer's step. The run id is kept in ``output_dir/wandb_run_id.txt``, so a resumed
    training run continues the same wandb run (``resume="allow"``); wandb keeps steps
    monotonic, so records a killed run logged past its last checkpoint are not rewritten.

    ``WANDB_MODE`` (``offline``, ``disabled``), ``WANDB_DIR`` and the other ``WANDB_*``
    variables apply as wandb documents them; without ``WANDB_DIR`` the run's files go into
    ``output_dir/wandb``, beside the run's other outputs.
    """

    def __init__(
        self, output_dir: Path, *, project: str, run_config: Mapping[str, Any] | None
    ) -> None:
        # lazy: optional extra (wandb), only for run.tracker = "wandb"
        import wandb

        self._wandb = wandb
        id_file = output_dir / WANDB_ID_FILE
        # wandb run ids are [a-z0-9]; 8 random hex digits as wandb's own ids.
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        kwargs: dict[str, Any] = {}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(output_dir)
        self.run = wandb.init(
            project=project,
            name=output_dir.resolve().name,
            id=run_id,
            resume="allow",
            config=dict(run_config or {}),
            **kwargs,
        )
        id_file.write_text(run_id + "\n")

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_images(
        self,
        tag: str,
        images: Sequence[np.ndarray],
        step: int,
        captions: Sequence[str] | None = None,
    ) -> None:
        labels: list[str | None] = list(captions) if captions else [None] * len(images)
        media = [
            self._wandb.Image(image, caption=caption)
            for image, caption in zip(images, labels, strict=True)
        ]
        self.run.log({tag: media}, step=step)

    def flush(self) -> None:
        pass  # wandb streams its records itself (offline: into the run's .wandb file)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before wandb's service process has written the run's last
        # records (seen in offline mode): stopping the service waits for it, so the files are
        # complete when the trainer returns.
        self._wandb.teardown()


def check_trackers(report_to: Sequence[str]) -> None:
    """Launch-time check (the config itself is read where wandb may be absent, e.g. an export's
    config on another machine): every tracker named can be imported. Raises ConfigError."""
    for name in report_to:
        if name not in TRACKERS:  # the config checks this too; kept for library callers
            raise ConfigError(f"run.report_to: {name!r} is not one of {list(TRACKERS)}")
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "run.report_to contains 'wandb' but the wandb package is not installed: "
            "pip install wandb (or pip install 'e2ed2[wandb]')"
        )


def build_trackers(
    report_to: Sequence[str],
    output_dir: Path,
    *,
    resume_step: int,
    wandb_project: str = "e2ed2",
    run_config: Mapping[str, Any] | None = None,
) -> list[Tracker]:
    """The trackers ``report_to`` names, in its order (rank 0 only)."""
    check_trackers(report_to)
    trackers: list[Tracker] = []
    for name in report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(output_dir, resume_step=resume_step))
        else:
            trackers.append(WandbTracker(output_dir, project=wandb_project, run_config=run_config))
    return trackers
