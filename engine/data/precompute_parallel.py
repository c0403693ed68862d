"""Precompute in chunks: N processes, resume after a kill, one progress bar (data/precompute.py
encodes; this module decides who encodes what, records what is finished and merges).

Chunks. The reader's records (samples and skipped inputs, in the reader's fixed order) are cut
into chunks of ``shard_size`` records; chunk ``c`` is encoded by process ``c mod N`` into its own
files, ``shard-<c>.safetensors`` (and ``shard-<c>-<k>.safetensors`` for the k-th further bucket
of that chunk). A chunk's files depend on its records only, so the folder is the same for any
N. Every process reads the whole record stream (cheap: readers do not decode images) and
decodes and encodes only its own chunks.

Publishing. Shard files are written atomically (temporary name, rename); a chunk is finished
when its manifest ``.precompute/chunk-<c>.json`` (its shards, buckets, skipped inputs, images
found) is renamed into place, after its shards. A rerun with the same settings
(``.precompute/plan.json``) skips chunks with a manifest and encodes the rest again, over any
files a killed process left; the merge (the parent, or rank 0 under a launcher) writes
``index.json`` from the manifests once every process has finished, then removes
``.precompute/`` and leftover temporary files, so a resumed folder equals an uninterrupted one
byte for byte (the index holds no time stamp for that reason).

Processes. ``num_processes > 1`` spawns workers on this machine (``spawn``: CUDA cannot be
forked); under a launcher (``torchrun`` / ``deepspeed`` set ``RANK``, ``WORLD_SIZE``) each rank
is a worker. Rank 0 prepares the folder and the others wait for it at one gloo barrier; after
that, ranks coordinate through files only (no collective runs during the hours of encoding).
Workers report the images they have passed in ``.precompute/progress-<w>.json``; the parent
(rank 0) polls them for one bar with images/s and ETA.

Hand-written rather than a pool library: the parts that matter here (chunk-to-file naming,
manifests written last, a merge that needs every part) are the format itself.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .storage import write_atomic

__all__ = [
    "FAIL_AFTER_CHUNK_ENV",
    "STATE_DIR",
    "ChunkFailed",
    "chunk_file_name",
    "chunks",
    "launcher_rank",
]

logger = logging.getLogger(__name__)

#: The folder of unfinished work inside the output folder (removed once index.json is written).
STATE_DIR = ".precompute"
#: Test hook: the process encoding chunk <value> is killed (SIGKILL) after writing that chunk's
#: shard files and before its manifest, i.e. mid-chunk (read only by :func:`maybe_fail`).
FAIL_AFTER_CHUNK_ENV = "E2ED2_PRECOMPUTE_FAIL_AFTER_CHUNK"
_POLL_S = 0.2


class ChunkFailed(RuntimeError):
    """A worker process ended without finishing its chunks (the message says which and how)."""


def launcher_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` under a launcher that started several ranks, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world


def chunks(records: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """``(chunk number, its records)``: consecutive runs of ``size`` records."""
    chunk: list[Any] = []
    number = 0
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield number, chunk
            number, chunk = number + 1, []
    if chunk:
        yield number, chunk


def chunk_file_name(chunk: int, part: int) -> str:
    """The k-th (``part``) shard file of a chunk: one per bucket met in it."""
    suffix = f"-{part}" if part else ""
    return f"shard-{chunk:05d}{suffix}.safetensors"


def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def manifest_path(out: Path, chunk: int) -> Path:
    return state_dir(out) / f"chunk-{chunk:05d}.json"


def read_manifest(out: Path, chunk: int) -> dict[str, Any] | None:
    """A finished chunk's manifest whose shard files are all present, else None."""
    path = manifest_path(out, chunk)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if all((out / shard["file"]).is_file() for shard in manifest["shards"]):
        return manifest
    return None


def publish_manifest(out: Path, chunk: int, manifest: dict[str, Any]) -> None:
    write_atomic(manifest_path(out, chunk), json.dumps(manifest, indent=1).encode())


def maybe_fail(chunk: int) -> None:
    """The one place :data:`FAIL_AFTER_CHUNK_ENV` is read (tests of resume: a kill mid-chunk)."""
    if os.environ.get(FAIL_AFTER_CHUNK_ENV) == str(chunk):
        logger.warning("%s=%d: killing this process mid-chunk", FAIL_AFTER_CHUNK_ENV, chunk)
        os.kill(os.getpid(), signal.SIGKILL)


def prepare(out: Path, plan: dict[str, Any], overwrite: bool) -> int:
    """Makes ``out`` ready for a run of ``plan``; returns how many chunks are already finished.

    An index.json (a finished folder) is refused unless ``overwrite``. An unfinished run's
    ``.precompute/plan.json`` equal to ``plan`` is resumed; another plan is refused unless
    ``overwrite`` (then every shard file, the null condition and the state are removed first)."""
    index_path = out / "index.json"
    state = state_dir(out)
    plan_path = state / "plan.json"
    if index_path.exists() and not overwrite:
        raise FileExistsError(
            f"{os.fspath(out)!r} already holds shards (index.json); pass overwrite=True "
            "(--overwrite) to replace them"
        )
    if plan_path.exists() and not overwrite:
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = {}
        changed = sorted(key for key in plan.keys() | old.keys() if plan.get(key) != old.get(key))
        if changed:
            key = changed[0]
            raise FileExistsError(
                f"{os.fspath(out)!r} holds an unfinished precompute with other settings "
                f"({key}: {old.get(key)!r} there, {plan.get(key)!r} now); rerun it with the "
                "same settings to resume, or pass overwrite=True (--overwrite) to start over"
            )
    if overwrite:
        # The index first, so the folder never looks complete with mixed shards.
        index_path.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)
        for path in out.glob("shard-*.safetensors"):
            path.unlink()
        (out / "null_condition.safetensors").unlink(missing_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    for path in [*state.glob("progress-*.json"), *state.glob("error-*.txt")]:
        path.unlink()
    write_atomic(plan_path, json.dumps(plan, indent=1, sort_keys=True).encode())
    return len(list(state.glob("chunk-*.json")))


class ProgressFile:
    """A worker's count of images passed (its chunks only), written at most every 0.5 s."""

    def __init__(self, out: Path, worker: int) -> None:
        self.path = state_dir(out) / f"progress-{worker}.json"
        self.images = 0
        self.chunks_encoded: list[int] = []
        self._written = 0.0

    def add(self, images: int) -> None:
        self.images += images
        if time.monotonic() - self._written > 0.5:
            self._write(done=False)

    def finish(self, records: int) -> None:
        """Every chunk of this worker is finished; ``records``: the reader's whole count."""
        self._write(done=True, records=records)

    def _write(self, done: bool, records: int | None = None) -> None:
        state: dict[str, Any] = {"images": self.images, "done": done, "records": records}
        state["chunks_encoded"] = self.chunks_encoded
        write_atomic(self.path, json.dumps(state).encode())
        self._written = time.monotonic()


def read_progress(out: Path, worker: int) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir(out) / f"progress-{worker}.json").read_text())
    except (OSError, ValueError):
        return None


def error_path(out: Path, worker: int) -> Path:
    return state_dir(out) / f"error-{worker}.txt"


def run_workers(
    out: Path,
    workers: int,
    target: Callable[..., None],
    args: tuple[Any, ...],
    bar: Any,
    *,
    in_process: bool,
    own_rank: int | None = None,
) -> list[dict[str, Any]]:
    """Runs ``target(*args, worker, workers)`` for every worker and returns their final progress
    records once all are done; ``bar`` (tqdm) follows their images.

    ``in_process``: one worker, here (``own_rank`` None), or this process is rank ``own_rank``
    of a launcher whose other ranks run elsewhere; else ``workers`` spawned processes."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(_POLL_S):
            _update(bar, out, workers)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        if in_process:
            target(*args, own_rank or 0, workers)
            while True:  # the other ranks (a launcher's) finish on their own
                states = [read_progress(out, w) for w in range(workers)]
                if all(s is not None and s["done"] for s in states):
                    break
                time.sleep(_POLL_S)
        else:
            context = multiprocessing.get_context("spawn")
            processes = [
                context.Process(target=_worker_main, args=(target, args, w, workers), daemon=False)
                for w in range(workers)
            ]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            failed = [
                (w, p.exitcode) for w, p in enumerate(processes) if p.exitcode not in (0, None)
            ]
            if failed:
                raise ChunkFailed(_failure_message(out, failed))
            states = [read_progress(out, w) for w in range(workers)]
    finally:
        stop.set()
        poller.join()
    _update(bar, out, workers)
    return states  # type: ignore[return-value]


def _worker_main(
    target: Callable[..., None], args: tuple[Any, ...], worker: int, workers: int
) -> None:
    """A spawned worker: its failure's message goes to a file the parent reads."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args[0]["out"])
    try:
        target(*args, worker, workers)
    except BaseException as error:
        error_path(out, worker).write_text(f"{type(error).__name__}: {error}")
        raise


def _failure_message(out: Path, failed: list[tuple[int, int]]) -> str:
    parts = []
    for worker, code in failed:
        path = error_path(out, worker)
        if path.is_file():
            parts.append(f"worker {worker}: {path.read_text().strip()}")
        elif code < 0:
            parts.append(f"worker {worker} killed by signal {-code}")
        else:
            parts.append(f"worker {worker} exited with code {code}")
    return (
        "precompute stopped before every chunk was finished ("
        + "; ".join(parts)
        + f"); finished chunks are kept in {os.fspath(out)!r}: rerun the same command to resume"
    )


def _update(bar: Any, out: Path, workers: int) -> None:
    images = 0
    for worker in range(workers):
        state = read_progress(out, worker)
        images += state["images"] if state else 0
    if images > bar.n:
        bar.update(images - bar.n)


def wait_for_barrier() -> None:
    """Under a launcher: every rank waits here until rank 0 has prepared the folder (gloo, on
    the launcher's MASTER_ADDR / MASTER_PORT); the group is closed again right after."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def wait_for_index(out: Path) -> dict[str, Any]:
    """A rank other than 0: waits for rank 0's merge and returns the index it wrote."""
    path = out / "index.json"
    while not path.is_file():
        time.sleep(_POLL_S)
    return json.loads(path.read_text())


def finished_manifests(out: Path, records: int, chunk_size: int) -> list[dict[str, Any]]:
    """Every chunk's manifest, in chunk order (all must be finished)."""
    manifests = []
    for chunk in range(math.ceil(records / chunk_size)):
        manifest = read_manifest(out, chunk)
        if manifest is None:
            raise ChunkFailed(f"chunk {chunk} of {os.fspath(out)!r} is not finished")
        manifests.append(manifest)
    return manifests


def clean_up(out: Path, shard_files: set[str]) -> None:
    """After index.json: drops the state folder, temporary files of killed writers and shard
    files no chunk lists, so the folder holds the index's files only."""
    shutil.rmtree(state_dir(out), ignore_errors=True)
    for path in out.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
    for path in out.glob("shard-*.safetensors"):
        if path.name not in shard_files:
            path.unlink(missing_ok=True)
