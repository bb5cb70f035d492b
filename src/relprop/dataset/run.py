"""explain_dataset: a Dataset in, safetensors shards and a manifest out; resumable.

The data is read by a DataLoader (decoding in worker processes), explained batch by batch,
and written by a background thread, so reading, explaining and writing overlap. Batches
never straddle shards, and shards are fixed by dataset index, so the output does not depend
on how many processes made it (relprop.dataset.distributed). The run's set-up, resume and
shard loop are relprop.dataset.job's; this module says what a shard of explanations holds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..composites import Composite
from ..errors import RelpropError
from ..explain import Explainer
from .distributed import Group
from .images import class_names
from .job import (
    Rows,
    ShardSummary,
    batch_target,
    check_positive,
    in_group,
    start_run,
    target_spec,
)
from .manifest import write_manifest
from .shards import shard_name, shard_paths, stale_temps
from .store import Store, dtype_name, parse_dtype

MAX_OUTPUT = 4096  # model outputs up to this many values per sample are kept


@dataclass
class RunSummary(ShardSummary):
    """What this process did (ShardSummary), and where rank 0 put the manifest."""

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
    check_positive(batch_size=batch_size, shard_size=shard_size)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise RelpropError(f"num_workers={num_workers!r}: must be 0 or more")
    job = _Job(store=Store.parse(store), dtype=parse_dtype(dtype), target=target_spec(target),
               batch_size=batch_size, num_workers=num_workers, shard_size=shard_size,
               progress=progress)
    return in_group(device, lambda dev, group: job.run(
        model, dataset, Path(out_dir), composite, params, dev, group,
        model_name or type(model).__name__))


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
        summary = RunSummary(out, world_size=group.world)
        settings = {"target": self.target, "store": self.store.spec,
                    "dtype": dtype_name(self.dtype), "shard_size": self.shard_size}
        run = start_run(model, dataset, out, composite, params, dev, group, name, settings,
                        lambda k, meta, t: _rows(k, t["index"], t["label"], t["target"],
                                                 shard_paths(meta)), summary)
        parts: list[dict[str, Tensor]] = []  # the batches of the shard being read

        def finish(k: int) -> tuple[dict[str, Tensor], dict[str, str], Rows]:
            shard = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            parts.clear()
            files = [run.paths[i] for i in shard["index"].tolist()] if run.paths else []
            return (shard, {"paths": json.dumps(files)},
                    _rows(k, shard["index"], shard["label"], shard["target"], files))

        def add(index: Tensor, x: Tensor, label: Tensor) -> None:
            parts.append(self._batch(run.explainer, index, x, label, dev))

        run.explain_shards(self.batch_size, self.num_workers, self.progress, add, finish,
                           summary)
        every = run.gather("explained")
        if every is not None:
            first = out / every[0]["shard"]
            extra = {"classes": class_names(dataset), "world_size": group.world,
                     "stored_shape": _stored_shape(first) if first.exists() else None}
            summary.manifest = write_manifest(out, run.config, every, extra)
            for tmp in stale_temps(out):
                tmp.unlink(missing_ok=True)
        group.barrier()
        summary.seconds = time.perf_counter() - start
        return summary

    def _batch(self, explainer: Explainer, index: Tensor, x: Tensor, label: Tensor,
               dev: torch.device) -> dict[str, Tensor]:
        x = x.to(dev, non_blocking=True)
        expl = explainer(x, target=batch_target(self.target, index, label, dev))
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
