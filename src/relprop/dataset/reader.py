"""Reading a finished run back: a lazy, memory-mapped view and per-class aggregates.

Nothing is loaded up front but the manifest; an item reads one sample's slice of one shard
(safetensors files are memory-mapped), and class means go through the shards one at a
time, so a 50,000-sample run is summarised in the memory of one shard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import RelpropError
from .manifest import read_manifest


def load_explanations(out_dir: str | Path) -> Explanations:
    """The explanations explain_dataset wrote to out_dir (after it finished)."""
    return Explanations(out_dir)


class Explanations:
    """len(), item i = the sample with dataset index i: a dict of relevance (as stored),
    target, label, index, path, explained (and output, if kept).

    `manifest` holds the run's description (model, composite, store, dtype, ...)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.manifest: dict[str, Any] = read_manifest(self.out_dir)
        self._rows = {r["index"]: r for r in self.manifest["samples"]}
        self._open: dict[str, Any] = {}

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or [])

    def indices(self) -> list[int]:
        return sorted(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, index: object) -> bool:
        return index in self._rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in self.indices():
            yield self[i]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._rows.get(int(index))
        if row is None:
            raise IndexError(f"no sample with dataset index {index} in {self.out_dir}")
        f, off = self._shard(row["shard"]), row["offset"]
        item: dict[str, Any] = {"index": row["index"], "path": row["path"]}
        names: list[str] = f.keys()  # a safetensors handle is not iterable
        for key in names:
            if key != "index":
                value = f.get_slice(key)[off:off + 1][0]
                item[key] = value if key in ("relevance", "output") else value.item()
        return item

    def _shard(self, name: str) -> Any:
        if name not in self._open:
            from safetensors import safe_open

            path = self.out_dir / name
            if not path.exists():
                raise RelpropError(f"{path} is missing (listed in the manifest)")
            self._open[name] = safe_open(str(path), framework="pt")
        return self._open[name]

    def shards(self) -> Iterator[dict[str, Tensor]]:
        """Each shard's tensors in turn (relevance as float32), one in memory at a time."""
        for name in sorted({r["shard"] for r in self._rows.values()}):
            f = self._shard(name)
            names: list[str] = f.keys()
            yield {k: f.get_tensor(k) for k in names}

    def class_means(self, by: str = "label") -> dict[int, Tensor]:
        """Mean stored relevance per class of the label (or the explained `target`),
        summed in float64 shard by shard."""
        if by not in ("label", "target"):
            raise RelpropError(f"by={by!r}: choose 'label' or 'target'")
        sums: dict[int, Tensor] = {}
        counts: dict[int, int] = {}
        for shard in self.shards():
            keys, rel = shard[by], shard["relevance"].double()
            for c in keys.unique().tolist():
                mask = keys == c
                part = rel[mask].sum(0)
                sums[c] = sums[c] + part if c in sums else part
                counts[c] = counts.get(c, 0) + int(mask.sum())
        return {c: (sums[c] / counts[c]).float() for c in sorted(sums)}

    def class_grid(self, path: str | Path, by: str = "label", columns: int = 10,
                   cmap: str = "bwr") -> Path:
        """The class-average heatmaps as one PNG grid (each map scaled to its own range)."""
        from ..visualize import heatmap, save_grid

        means = self.class_means(by)
        names = self.classes
        keys = list(means)
        if any(means[c].dim() not in (2, 3) for c in keys):
            raise RelpropError("class_grid needs image relevance (C, H, W) or (H, W)")
        pictures = [heatmap(means[c], cmap=cmap) for c in keys]
        counts = Counter(r[by] for r in self._rows.values())
        titles = [f"{names[c] if 0 <= c < len(names) else c} (n={counts[c]})" for c in keys]
        rows = [pictures[i:i + columns] for i in range(0, len(pictures), columns)]
        if len(rows) == 1:
            return save_grid(rows, path, col_titles=titles)
        # several rows: save_grid titles the first row and column, so name each row's
        # first class and count the columns from it
        return save_grid(rows, path, col_titles=[f"+{j}" for j in range(columns)],
                         row_titles=[titles[i] for i in range(0, len(titles), columns)])

    def count(self, by: str, c: int) -> int:
        """Samples whose label (or target) is c."""
        return sum(1 for r in self._rows.values() if r[by] == c)

    def close(self) -> None:
        self._open.clear()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Explanations({str(self.out_dir)!r}, {len(self)} samples, model={m['model']!r}, "
                f"composite={m['composite'].get('name')!r}, store={m['store']!r}, "
                f"dtype={m['dtype']!r})")
