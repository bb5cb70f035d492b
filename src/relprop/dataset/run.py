"""explain_dataset: a Dataset in, safetensors shards and a manifest out; resumable.

The data is read by a DataLoader (decoding in worker processes), explained batch by batch,
and written by a background thread, so reading, explaining and writing overlap. Batches
never straddle shards, and shards are fixed by dataset index, so the output does not depend
on how many processes made it (relprop.dataset.distributed).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..composites import Composite
from ..errors import RelpropError
from ..explain import Explainer
from ..progress import Progress
from . import shards
from .distributed import Group, join_group, pick_device
from .images import Indexed, class_names, sample_paths
from .manifest import (
    FORMAT,
    check_run,
    data_fingerprint,
    jsonable,
    model_fingerprint,
    run_id,
    write_manifest,
    write_run,
)
from .shards import (
    ShardWriter,
    describe_os_error,
    read_header,
    shard_name,
    shard_paths,
    stale_temps,
)
from .store import Store, dtype_name, parse_dtype

MAX_OUTPUT = 4096  # model outputs up to this many values per sample are kept


@dataclass
class RunSummary:
    """What this process did: shards written now and found finished from an earlier run."""

    out_dir: Path
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    samples_written: int = 0
    seconds: float = 0.0  # the whole call
    loop_seconds: float = 0.0  # reading, explaining and writing (no set-up, no manifest)
    manifest: Path | None = None  # on rank 0
    world_size: int = 1


def explain_dataset(model: nn.Module, dataset: Dataset, out_dir: str | Path,
                    composite: str | Composite = "epsilon_gamma_box", *,
                    target: int | str | None = None, batch_size: int = 32,
                    num_workers: int = 0, shard_size: int = 256, store: str | Store = "whole",
                    dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
                    progress: bool = True, model_name: str | None = None,
                    **params: Any) -> RunSummary:
    """Explain every sample of `dataset` ((x, label) items) into shards under out_dir.

    target: None / "pred" (predicted class), "label" (the dataset's label) or a class index.
    store: "whole", "channels" (summed over channels), "pool:K" (sums over KxK blocks) or
    "channels,pool:K"; dtype: float16, bfloat16 or float32. Composite parameters (low=,
    high=, epsilon=, ...) are keywords, as for Explainer. Running again into the same folder
    resumes: finished shards are kept, the rest are done; a different model, composite,
    target or storage is refused. Under torchrun every rank takes its share of the shards
    and rank 0 writes manifest.json at the end. The model is moved to `device` (default:
    this rank's GPU if there is one, else the CPU).
    """
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise RelpropError(f"{name}={value!r}: must be a positive integer")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise RelpropError(f"num_workers={num_workers!r}: must be 0 or more")
    job = _Job(store=Store.parse(store), dtype=parse_dtype(dtype), target=_target_spec(target),
               batch_size=batch_size, num_workers=num_workers, shard_size=shard_size,
               progress=progress)
    dev = pick_device(device)
    group = join_group(dev)
    try:
        return job.run(model, dataset, Path(out_dir), composite, params, dev, group,
                       model_name or type(model).__name__)
    finally:
        group.close()


def _target_spec(target: int | str | None) -> int | str:
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


@dataclass
class _Job:
    store: Store
    dtype: torch.dtype
    target: int | str
    batch_size: int
    num_workers: int
    shard_size: int
    progress: bool

    def run(self, model: nn.Module, dataset: Dataset, out: Path, composite: str | Composite,
            params: dict[str, Any], dev: torch.device, group: Group, name: str) -> RunSummary:
        start = time.perf_counter()
        _prepare_folder(out)
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
            "target": self.target, "store": self.store.spec, "dtype": dtype_name(self.dtype),
            "shard_size": self.shard_size, "num_samples": n,
            "data_fingerprint": data_fingerprint(paths)}
        from .. import __version__

        config.update(run_id=run_id(config), relprop_version=__version__)
        check_run(out, config)
        if group.local_rank == 0:  # one writer per node (the folder may not be shared)
            write_run(out, config)
        group.barrier()

        summary = RunSummary(out, world_size=group.world)
        rows: list[dict[str, Any]] = []
        todo: list[int] = []
        n_shards = math.ceil(n / self.shard_size)
        for k in group.shards(n_shards):
            for tmp in stale_temps(out, shard_name(k)):
                tmp.unlink(missing_ok=True)  # a shard cut off mid-write: redone below
            done = self._finished(out / shard_name(k), k, n, config["run_id"])
            if done is None:
                todo.append(k)
            else:
                rows += done
                summary.shards_skipped.append(k)

        loop_start = time.perf_counter()
        self._explain(explainer, dataset, out, todo, n, dev, group, config["run_id"],
                      paths, rows, summary)
        summary.loop_seconds = time.perf_counter() - loop_start
        gathered = group.gather(rows)
        if gathered is not None:
            every = [r for part in gathered for r in part]
            if len(every) != n:
                raise RelpropError(f"{len(every)} of {n} samples were explained; run again")
            first = out / every[0]["shard"]
            extra = {"classes": class_names(dataset), "world_size": group.world,
                     "stored_shape": _stored_shape(first) if first.exists() else None}
            summary.manifest = write_manifest(out, config, every, extra)
            for tmp in stale_temps(out):
                tmp.unlink(missing_ok=True)
        group.barrier()
        summary.seconds = time.perf_counter() - start
        return summary

    def _finished(self, path: Path, k: int, n: int, rid: str) -> list[dict[str, Any]] | None:
        """The rows of a shard an earlier run finished; None if it must be (re)done."""
        if not path.exists():
            return None
        try:
            meta, t = read_header(path)
        except Exception as exc:  # unreadable: not ours to trust, so redo it
            warnings.warn(f"{path} is unreadable ({exc}); writing it again", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        if meta.get("run_id") != rid:
            raise RelpropError(f"{path} was written by another run (run id "
                               f"{meta.get('run_id')}, this one {rid}); use another output "
                               "folder or delete that one")
        lo = k * self.shard_size
        expected = list(range(lo, min(n, lo + self.shard_size)))
        if t["index"].tolist() != expected:
            warnings.warn(f"{path} does not hold samples {lo}..{expected[-1]}; writing it "
                          "again", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        return _rows(k, t["index"], t["label"], t["target"], shard_paths(meta))

    def _explain(self, explainer: Explainer, dataset: Dataset, out: Path, todo: list[int],
                 n: int, dev: torch.device, group: Group, rid: str, paths: list[str] | None,
                 rows: list[dict[str, Any]], summary: RunSummary) -> None:
        S = self.shard_size
        batches = [list(range(b, min(b + self.batch_size, min(n, k * S + S))))
                   for k in todo for b in range(k * S, min(n, k * S + S), self.batch_size)]
        if not batches:
            return
        total = sum(len(b) for b in batches)
        loader = DataLoader(Indexed(dataset), batch_sampler=batches,
                            num_workers=self.num_workers, pin_memory=dev.type == "cuda",
                            persistent_workers=False)
        bar = Progress(total, self.progress and group.rank == 0,
                       f"rank 0 of {group.world}: " if group.active else "")
        writer = ShardWriter(out)
        parts: list[dict[str, Tensor]] = []
        try:
            for index, x, label in loader:
                parts.append(self._batch(explainer, index, x, label, dev))
                k = int(index[0]) // S
                if int(index[-1]) == min(n, k * S + S) - 1:  # the shard's last batch
                    shard = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                    parts = []
                    shard_files = ([paths[i] for i in shard["index"].tolist()]
                                   if paths else [])
                    writer.submit(k, shard, {"run_id": rid, "shard": str(k),
                                             "paths": json.dumps(shard_files)})
                    rows += _rows(k, shard["index"], shard["label"], shard["target"],
                                  shard_files)
                    summary.shards_written.append(k)
                    summary.samples_written += len(shard["index"])
                bar.update(len(index))
        except BaseException:
            writer.close(raise_errors=False)  # finished shards still land whole
            bar.close()
            raise
        writer.close()
        bar.close()

    def _batch(self, explainer: Explainer, index: Tensor, x: Tensor, label: Tensor,
               dev: torch.device) -> dict[str, Tensor]:
        x = x.to(dev, non_blocking=True)
        if self.target == "label":
            if (label < 0).any():
                raise RelpropError(f"target='label', but sample {int(index[label < 0][0])} "
                                   "has no label")
            target: Any = label.to(dev)
        else:
            target = None if self.target == "pred" else self.target
        expl = explainer(x, target=target)
        if not isinstance(expl.relevance, Tensor):
            raise RelpropError("explain_dataset explains models with one input tensor")
        kept = self.store.reduce(expl.relevance)
        rel = kept.to(self.dtype)
        if self.dtype != torch.float32 and torch.isinf(rel).any() and \
                torch.isfinite(kept).all():
            raise RelpropError(f"relevance exceeds {dtype_name(self.dtype)}'s range; store "
                               "it as bfloat16 or float32")
        out = {"relevance": rel.cpu(), "index": index.long(), "label": label.long(),
               "target": expl.target.reshape(len(index)).long().cpu(),
               "explained": expl.explained.reshape(len(index)).float().cpu()}
        flat = expl.output.reshape(len(index), -1)
        if flat.shape[1] <= MAX_OUTPUT:
            out["output"] = flat.float().cpu()
        return out


def _rows(k: int, index: Tensor, label: Tensor, target: Tensor,
          paths: list[str]) -> list[dict[str, Any]]:
    return [{"index": i, "shard": shard_name(k), "offset": j, "label": lab, "target": tgt,
             "path": paths[j] if paths else None}
            for j, (i, lab, tgt) in enumerate(zip(index.tolist(), label.tolist(),
                                                  target.tolist(), strict=True))]


def _stored_shape(path: Path) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.get_slice("relevance").get_shape()[1:])


def _prepare_folder(out: Path) -> None:
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
