"""A run over a dataset in shards, as explain_dataset and relprop.concepts.collect make one.

Both write the same kind of folder: run.json first (what the run is), then shards fixed
by dataset index, each whole or absent, then rank 0's manifest. What differs is only what
a shard holds, so the set-up, the resume scan and the loop over shards live here once, and
a caller says what it keeps of a batch and what a finished shard writes.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..composites import Composite
from ..errors import RelpropError
from ..explain import Explainer
from ..progress import Progress
from . import shards
from .distributed import Group, join_group, pick_device
from .images import Indexed, sample_paths
from .manifest import (
    FORMAT,
    check_run,
    data_fingerprint,
    jsonable,
    model_fingerprint,
    run_id,
    write_run,
)
from .shards import ShardWriter, describe_os_error, read_header, shard_name, stale_temps

Rows = list[dict[str, Any]]
T = TypeVar("T")


@dataclass
class ShardSummary:
    """What this process did: shards written now and found finished from an earlier run."""

    out_dir: Path
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    samples_written: int = 0
    seconds: float = 0.0  # the whole call
    loop_seconds: float = 0.0  # reading, explaining and writing (no set-up, no manifest)


def check_positive(**values: Any) -> None:
    """Refuse sizes that would make no shards or no batches, before any work."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise RelpropError(f"{name}={value!r}: must be a positive integer")


def target_spec(target: int | str | None) -> int | str:
    """'pred', 'label' or a class index: the one spelling that goes into run.json."""
    if target is None or target == "pred":
        return "pred"
    if target == "label":
        return "label"
    if isinstance(target, int) and not isinstance(target, bool) and target >= 0:
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    raise RelpropError(f"target={target!r}: use None or 'pred' (predicted class), 'label' "
                       "(the dataset's label) or a class index")


def batch_target(spec: int | str, index: Tensor, label: Tensor, dev: torch.device) -> Any:
    """The Explainer's target for one batch (labels checked: -1 means the sample has none)."""
    if spec == "label":
        if (label < 0).any():
            raise RelpropError(f"target='label', but sample {int(index[label < 0][0])} "
                               "has no label")
        return label.to(dev)
    return None if spec == "pred" else spec


def in_group(device: str | torch.device | None,
             work: Callable[[torch.device, Group], T]) -> T:
    """work(device, group) with this rank's device, inside torchrun's group if there is one."""
    dev = pick_device(device)
    group = join_group(dev)
    try:
        return work(dev, group)
    finally:
        group.close()


def prepare_folder(out: Path) -> None:
    """Create the folder and prove it writable before any work is spent."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RelpropError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    probe = out / f".write-probe.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as fh:
            shards.write_through(fh, b"relprop")
    except OSError as exc:
        probe.unlink(missing_ok=True)
        raise RelpropError(describe_os_error(exc, out)) from exc
    probe.unlink(missing_ok=True)


# a finished shard's rows, from its metadata and its index/label/target tensors
RowsOf = Callable[[int, dict[str, str], dict[str, Tensor]], Rows]
# a shard's last batch seen: its tensors, its metadata (besides run id and number), its rows
Finish = Callable[[int], tuple[dict[str, Tensor], dict[str, str], Rows]]


@dataclass
class Run:
    """A run started: its explainer, run.json's config and the shards this rank still owes."""

    out: Path
    dataset: Dataset
    explainer: Explainer
    config: dict[str, Any]
    paths: list[str] | None
    n: int
    dev: torch.device
    group: Group
    todo: list[int]
    rows: Rows  # the finished shards' rows; explain_shards adds the new ones

    @property
    def shard_size(self) -> int:
        return int(self.config["shard_size"])

    def explain_shards(self, batch_size: int, num_workers: int, progress: bool,
                       add: Callable[[Tensor, Tensor, Tensor], None], finish: Finish,
                       summary: ShardSummary) -> None:
        """Read the shards still to do batch by batch (add(index, x, label) each), and write
        each one when its last batch is in (finish(k)), in a background thread."""
        start = time.perf_counter()
        S, n = self.shard_size, self.n
        batches = [list(range(b, min(b + batch_size, min(n, k * S + S))))
                   for k in self.todo for b in range(k * S, min(n, k * S + S), batch_size)]
        if batches:
            loader = DataLoader(Indexed(self.dataset), batch_sampler=batches,
                                num_workers=num_workers, pin_memory=self.dev.type == "cuda",
                                persistent_workers=False)
            bar = Progress(sum(len(b) for b in batches), progress and self.group.rank == 0,
                           f"rank 0 of {self.group.world}: " if self.group.active else "")
            writer = ShardWriter(self.out)
            try:
                for index, x, label in loader:
                    add(index, x, label)
                    k = int(index[0]) // S
                    if int(index[-1]) == min(n, k * S + S) - 1:  # the shard's last batch
                        tensors, meta, rows = finish(k)
                        writer.submit(k, tensors, {"run_id": self.config["run_id"],
                                                   "shard": str(k), **meta})
                        self.rows += rows
                        summary.shards_written.append(k)
                        summary.samples_written += len(tensors["index"])
                    bar.update(len(index))
            except BaseException:
                writer.close(raise_errors=False)  # finished shards still land whole
                bar.close()
                raise
            writer.close()
            bar.close()
        summary.loop_seconds = time.perf_counter() - start

    def gather(self, verb: str) -> Rows | None:
        """Every rank's rows in dataset order on rank 0 (None elsewhere); all n or an error."""
        gathered = self.group.gather(self.rows)
        if gathered is None:
            return None
        every = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        if len(every) != self.n:
            raise RelpropError(f"{len(every)} of {self.n} samples were {verb}; run again")
        return every


def start_run(model: nn.Module, dataset: Dataset, out: Path, composite: str | Composite,
              params: dict[str, Any], dev: torch.device, group: Group, name: str,
              settings: dict[str, Any], rows_of: RowsOf, summary: ShardSummary) -> Run:
    """Check the folder, build the explainer, write run.json (settings: target, store,
    dtype, shard_size, in the caller's order) and find which of this rank's shards an
    earlier run finished (their rows kept, their numbers in summary.shards_skipped)."""
    prepare_folder(out)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise RelpropError("the dataset is empty")
    paths = sample_paths(dataset)
    if paths is not None and len(paths) != n:
        paths = None
    param = next(model.parameters(), None)
    if param is not None and param.device != dev:
        model.to(dev)
    explainer = Explainer(model, composite, **params)
    config: dict[str, Any] = {
        "format": FORMAT, "model": name, "model_fingerprint": model_fingerprint(model),
        "composite": explainer.composite.describe(), "params": jsonable(params),
        **settings, "num_samples": n, "data_fingerprint": data_fingerprint(paths)}
    from .. import __version__

    config.update(run_id=run_id(config), relprop_version=__version__)
    check_run(out, config)
    if group.local_rank == 0:  # one writer per node (the folder may not be shared)
        write_run(out, config)
    group.barrier()

    run = Run(out, dataset, explainer, config, paths, n, dev, group, [], [])
    for k in group.shards(math.ceil(n / run.shard_size)):
        for tmp in stale_temps(out, shard_name(k)):
            tmp.unlink(missing_ok=True)  # a shard cut off mid-write: redone below
        done = _finished(run, k)
        if done is None:
            run.todo.append(k)
        else:
            run.rows += rows_of(k, *done)
            summary.shards_skipped.append(k)
    return run


def _finished(run: Run, k: int) -> tuple[dict[str, str], dict[str, Tensor]] | None:
    """The header of a shard an earlier run finished; None if it must be (re)done."""
    path = run.out / shard_name(k)
    if not path.exists():
        return None
    try:
        meta, t = read_header(path)
    except Exception as exc:  # unreadable: not ours to trust, so redo it
        warnings.warn(f"{path} is unreadable ({exc}); writing it again", stacklevel=4)
        path.unlink(missing_ok=True)
        return None
    rid = run.config["run_id"]
    if meta.get("run_id") != rid:
        raise RelpropError(f"{path} was written by another run (run id "
                           f"{meta.get('run_id')}, this one {rid}); use another output "
                           "folder or delete that one")
    lo = k * run.shard_size
    expected = list(range(lo, min(run.n, lo + run.shard_size)))
    if t["index"].tolist() != expected:
        warnings.warn(f"{path} does not hold samples {lo}..{expected[-1]}; writing it "
                      "again", stacklevel=4)
        path.unlink(missing_ok=True)
        return None
    return meta, t
