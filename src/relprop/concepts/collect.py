"""Reference samples over a dataset ("what is concept 3?"): one pass over the data, every
chosen layer recorded at once, keeping per channel the top-n samples by relevance (its
sum over positions, and its largest value: CRP's RelMax) and by activation (ActMax), and
per class the mean relevance of every channel.

Relevance starts at the model's output (the predicted class, the label or a fixed class),
not at the layer's activations. The pass is relprop.dataset's: shards fixed by dataset
index (shard k, samples k*S..k*S+S-1, to rank k mod W under torchrun), each written
whole or not at all, so a run stopped even by kill -9 resumes with the rest. A shard
keeps only its own top-n per channel, so memory does not grow with the dataset; rank 0
merges the shards into references.safetensors at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..composites import Composite
from ..dataset import job as pipeline  # explain_dataset's: set-up, resume, shard loop
from ..dataset.distributed import Group
from ..dataset.images import class_names
from ..dataset.job import Rows, ShardSummary
from ..dataset.manifest import write_manifest
from ..dataset.shards import encode_shard, shard_name, write_atomic
from ..errors import RelpropError
from ..explain import DEFAULT_COMPOSITE, Explainer
from .relevance import capture

MEASURES = ("relevance", "relevance_max", "activation", "activation_max")
REFERENCES_FILE = "references.safetensors"


class CollectSummary(ShardSummary):
    """What this process did (as explain_dataset's RunSummary)."""


class TopN:
    """The n best samples per channel so far: (k, C) indices, scores and positions, best
    first; ties go to the smaller dataset index, so the order never depends on the batches."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.index: Tensor | None = None
        self.score: Tensor | None = None
        self.position: Tensor | None = None

    def add(self, index: Tensor, score: Tensor, position: Tensor) -> None:
        """index (k,) or (k, C); score and position (k, C)."""
        if index.dim() == 1:
            index = index[:, None].expand_as(score)
        if self.index is not None:
            index = torch.cat([self.index, index])
            score = torch.cat([self.score, score])
            position = torch.cat([self.position, position])
        by_index = index.argsort(dim=0, stable=True)
        index, score, position = (t.gather(0, by_index) for t in (index, score, position))
        best = score.argsort(dim=0, descending=True, stable=True)[:self.n]
        self.index, self.score, self.position = (t.gather(0, best).contiguous()
                                                 for t in (index, score, position))


def scores(value: Tensor, c: list[Tensor | None], axis: int, normalize: bool
           ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per sample and channel, each measure's score and the flat position it peaks at."""
    a = value.detach().float().movedim(axis, 1)
    a = a.reshape(a.shape[0], a.shape[1], -1)
    r = torch.zeros_like(a)
    if c[0] is not None:
        r = a * c[0].detach().float().movedim(axis, 1).reshape(a.shape)
    if len(c) > 1 and c[1] is not None:
        r = r + c[1].detach().float().movedim(axis, 1).reshape(a.shape)
    r_max, r_pos = r.max(-1)
    a_max, a_pos = a.max(-1)
    out = {"relevance": (r.sum(-1), r_pos), "relevance_max": (r_max, r_pos),
           "activation": (a.sum(-1), a_pos), "activation_max": (a_max, a_pos)}
    if normalize:  # zennit-crp's abs_norm: each sample's scores over its sum of |score|
        out = {k: (s / (s.abs().sum(1, keepdim=True) + 1e-10), p) for k, (s, p) in out.items()}
    return out


def collect(model: nn.Module, dataset: Dataset, layers: Sequence[str], out: str | Path,
            composite: str | Composite = DEFAULT_COMPOSITE, *, n: int = 40,
            target: int | str | None = None, batch_size: int = 32, num_workers: int = 0,
            shard_size: int = 256, normalize: bool = False,
            device: str | torch.device | None = None, progress: bool = True,
            model_name: str | None = None, **params: Any) -> CollectSummary:
    """Collect reference samples of every channel of `layers` over `dataset` ((x, label)
    items) into `out`; read them with relprop.concepts.load(out).

    target: None / "pred" (predicted class), "label" or a class index: where relevance
    starts. n: samples kept per channel and measure. normalize: divide each sample's
    scores by their sum of magnitudes over the channels first (zennit-crp's abs_norm).
    Composite parameters (low=, high=, ...) are keywords. Running again into the same
    folder resumes; under torchrun each rank takes its share of the shards."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise RelpropError("name at least one layer")
    pipeline.check_positive(n=n, batch_size=batch_size, shard_size=shard_size)
    job = _Job(names, n, pipeline.target_spec(target), batch_size, num_workers, shard_size,
               normalize, progress)
    return pipeline.in_group(device, lambda dev, group: job.run(
        model, dataset, Path(out), composite, params, dev, group,
        model_name or type(model).__name__))


@dataclass
class _Job:
    layers: list[str]
    n: int
    target: int | str
    batch_size: int
    num_workers: int
    shard_size: int
    normalize: bool
    progress: bool

    def run(self, model: nn.Module, dataset: Dataset, out: Path, composite: str | Composite,
            params: dict[str, Any], dev: torch.device, group: Group,
            name: str) -> CollectSummary:
        start = time.perf_counter()
        summary = CollectSummary(out)
        settings = {"target": self.target, "dtype": "float32", "shard_size": self.shard_size,
                    "store": {"kind": "concepts", "layers": self.layers, "n": self.n,
                              "normalize": self.normalize}}
        run = pipeline.start_run(model, dataset, out, composite, params, dev, group, name,
                                 settings, lambda k, meta, t: _rows(k, t), summary)
        shard = _Shard(self.layers, self.n)

        def add(index: Tensor, x: Tensor, label: Tensor) -> None:
            shard.add(*self._batch(run.explainer, index, x, label, dev))

        def finish(k: int) -> tuple[dict[str, Tensor], dict[str, str], Rows]:
            nonlocal shard
            tensors, meta = shard.tensors(), {"layers": json.dumps(shard.meta)}
            shard = _Shard(self.layers, self.n)
            return tensors, meta, _rows(k, tensors)

        run.explain_shards(self.batch_size, self.num_workers, self.progress, add, finish,
                           summary)
        every = run.gather("seen")
        if every is not None:
            extra = self._merge(out, sorted({r["shard"] for r in every}))
            extra["classes"] = class_names(dataset)
            extra["paths"] = run.paths
            write_manifest(out, run.config, every, extra)
        group.barrier()
        summary.seconds = time.perf_counter() - start
        return summary

    def _batch(self, explainer: Explainer, index: Tensor, x: Tensor, label: Tensor,
               dev: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
        x = x.to(dev, non_blocking=True)
        got = capture(explainer, (x,), pipeline.batch_target(self.target, index, label, dev),
                      self.layers)
        stats = {}
        for key, site in got.sites.items():
            gate = got.gates[site.step]
            assert gate.value is not None
            stats[key] = (scores(gate.value, got.grads[0][site.step], gate.axis,
                                 self.normalize), gate.value.shape[gate.axis], gate.axis)
        return (index.long(), label.long(), got.target[:, 0].long().cpu(),
                got.explained[:, 0].float().cpu(), stats)

    def _merge(self, out: Path, shard_files: list[str]) -> dict[str, Any]:
        """The shards' top-n merged into references.safetensors; what the manifest adds."""
        from safetensors import safe_open

        tops: dict[tuple[str, str], TopN] = {}
        sums: dict[str, dict[int, Tensor]] = {k: {} for k in self.layers}
        counts: dict[int, int] = {}
        meta: dict[str, Any] = {}
        for name in shard_files:
            with safe_open(str(out / name), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("layers", "{}"))
                for key in self.layers:
                    for m in MEASURES:
                        p = f"{key}/{m}"
                        tops.setdefault((key, m), TopN(self.n)).add(
                            f.get_tensor(p + "/index"), f.get_tensor(p + "/score"),
                            f.get_tensor(p + "/position"))
                    classes = f.get_tensor(f"{key}/class").tolist()
                    part = f.get_tensor(f"{key}/class_sum")
                    for j, c in enumerate(classes):
                        sums[key][c] = sums[key][c] + part[j] if c in sums[key] else part[j]
                for c, cnt in zip(f.get_tensor("class").tolist(),
                                  f.get_tensor("class_count").tolist(), strict=True):
                    counts[c] = counts.get(c, 0) + cnt
        tensors = {}
        for (key, m), top in tops.items():
            assert top.index is not None
            tensors[f"{key}/{m}/index"] = top.index
            tensors[f"{key}/{m}/score"] = top.score
            tensors[f"{key}/{m}/position"] = top.position
        classes = sorted(counts)
        tensors["class"] = torch.tensor(classes, dtype=torch.long)
        tensors["class_count"] = torch.tensor([counts[c] for c in classes], dtype=torch.long)
        for key in self.layers:
            tensors[f"{key}/class_sum"] = torch.stack([sums[key][c] for c in classes])
        write_atomic(out / REFERENCES_FILE, encode_shard(tensors, {"layers": json.dumps(meta)}))
        return {"layers": meta, "measures": list(MEASURES), "n": self.n,
                "normalize": self.normalize}


class _Shard:
    """One shard's running top-n per layer and measure, and its per-class sums."""

    def __init__(self, layers: list[str], n: int) -> None:
        self.layers, self.n = layers, n
        self.tops = {(k, m): TopN(n) for k in layers for m in MEASURES}
        self.sums: dict[str, dict[int, Tensor]] = {k: {} for k in layers}
        self.counts: dict[int, int] = {}
        self.rows: dict[str, list[Tensor]] = {"index": [], "label": [], "target": [],
                                              "explained": []}
        self.meta: dict[str, Any] = {}

    def add(self, index: Tensor, label: Tensor, target: Tensor, explained: Tensor,
            stats: dict[str, Any]) -> None:
        for key, value in (("index", index), ("label", label), ("target", target),
                           ("explained", explained)):
            self.rows[key].append(value.cpu())
        for c in target.unique().tolist():
            self.counts[c] = self.counts.get(c, 0) + int((target == c).sum())
        for key, (measures, width, axis) in stats.items():
            self.meta[key] = {"channels": width, "axis": axis}
            for m, (score, position) in measures.items():
                self.tops[key, m].add(index, score.cpu(), position.cpu())
            rel = measures["relevance"][0].double().cpu()
            for c in target.unique().tolist():
                part = rel[target == c].sum(0)
                s = self.sums[key]
                s[c] = s[c] + part if c in s else part

    def tensors(self) -> dict[str, Tensor]:
        out = {k: torch.cat(v) for k, v in self.rows.items()}
        for (key, m), top in self.tops.items():
            assert top.index is not None
            out[f"{key}/{m}/index"] = top.index
            out[f"{key}/{m}/score"] = top.score
            out[f"{key}/{m}/position"] = top.position
        classes = sorted(self.counts)
        out["class"] = torch.tensor(classes, dtype=torch.long)
        out["class_count"] = torch.tensor([self.counts[c] for c in classes], dtype=torch.long)
        for key in self.layers:
            out[f"{key}/class"] = torch.tensor(classes, dtype=torch.long)
            out[f"{key}/class_sum"] = torch.stack([self.sums[key][c] for c in classes])
        return out


def _rows(k: int, t: dict[str, Tensor]) -> list[dict[str, Any]]:
    return [{"index": i, "shard": shard_name(k), "offset": j, "label": lab, "target": tgt}
            for j, (i, lab, tgt) in enumerate(zip(t["index"].tolist(), t["label"].tolist(),
                                                  t["target"].tolist(), strict=True))]
