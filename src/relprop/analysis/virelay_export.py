"""A ViRelAy project from an explain_dataset run and its SpRAy file.

ViRelAy (pip `virelay`) is a web viewer of a dataset, its heatmaps, embeddings and
clusterings. Its project is a YAML file naming a label map (JSON), a dataset HDF5 file
(images), attribution HDF5 files (heatmaps, model outputs, labels) and analysis HDF5 files;
relprop's spray.h5 already has the analysis layout and is copied as it is. Everything is
written shard by shard, so no more than one shard's heatmaps are in memory.

Open it with `python -m virelay OUT_DIR/virelay/project.yaml` (then http://localhost:8000).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import RelpropError
from ._deps import need

PROJECT = "project.yaml"


def export_virelay(source: str | Path | Any, dest: str | Path | None = None, *,
                   dataset: Any = None, spray_file: str | Path | None = None,
                   name: str | None = None) -> Path:
    """Write a ViRelAy project for an explain_dataset folder (or loaded Explanations) into
    `dest` (default OUT_DIR/virelay); returns the project YAML's path.

    The images come from `dataset` (the Dataset that was explained: item i = (x, label),
    x in [0, 1], (C, H, W)) or, for runs over image files, from the paths in the manifest.
    spray_file: the SpRAy analysis (default OUT_DIR/spray.h5; run spray first)."""
    from ..dataset.reader import Explanations, load_explanations

    h5py = need("h5py")
    expl = source if isinstance(source, Explanations) else load_explanations(source)
    spray_path = Path(spray_file) if spray_file else expl.out_dir / "spray.h5"
    if not spray_path.exists():
        raise RelpropError(f"{spray_path} does not exist: run relprop analyze (or "
                           "relprop.analysis.spray) first")
    dest = expl.out_dir / "virelay" if dest is None else Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    indices = expl.indices()
    n_classes = _class_count(expl)
    names = expl.classes or [str(c) for c in range(n_classes)]
    labels = [{"index": c, "word_net_id": str(c),
               "name": names[c] if c < len(names) else str(c)} for c in range(n_classes)]
    (dest / "label-map.json").write_text(json.dumps(labels, indent=1))

    with h5py.File(dest / "attribution.h5", "w") as f:
        rel = out = None
        lab = f.create_dataset("label", (len(indices),), dtype=np.int64)
        idx = f.create_dataset("index", data=np.asarray(indices, dtype=np.int64))
        del idx
        row = {i: k for k, i in enumerate(indices)}
        for shard in expl.shards():
            maps = _hwc(shard["relevance"].float(), relevance=True)
            if rel is None:
                rel = f.create_dataset("attribution", (len(indices), *maps.shape[1:]),
                                       dtype=np.float32)
                width = shard["output"].shape[1] if "output" in shard else n_classes
                out = f.create_dataset("prediction", (len(indices), width), dtype=np.float32)
            where = [row[i] for i in shard["index"].tolist()]
            for j, k in enumerate(where):  # rows in dataset-index order
                rel[k] = maps[j]
                out[k] = (shard["output"][j].float().numpy() if "output" in shard
                          else np.eye(width, dtype=np.float32)[int(shard["target"][j])])
                lab[k] = int(shard["label"][j])
        height, width_px = (rel.shape[1], rel.shape[2]) if rel is not None else (0, 0)

    _write_images(dest / "dataset.h5", expl, indices, dataset, (height, width_px), h5py)
    shutil.copyfile(spray_path, dest / "spray.h5")
    m = expl.manifest
    project = dest / PROJECT
    project.write_text(_yaml(
        name=name or f"relprop: {m.get('model', 'model')} on {expl.out_dir.name}",
        model=str(m.get("model", "model")), width=width_px, height=height,
        method=str(m["composite"].get("name", "lrp")),
        strategy="true_label" if m.get("target") == "label" else "predicted_label"))
    return project


def _class_count(expl: Any) -> int:
    most = max(max(r["label"], r["target"]) for r in expl.manifest["samples"])
    return max(len(expl.classes), most + 1)


def _hwc(x: Tensor, relevance: bool = False) -> np.ndarray:
    """(N, C, H, W) or (N, H, W) -> (N, H, W, 3): ViRelAy reads channels last, and a
    one-channel map is split over three (relevance: a third each, so sums are kept)."""
    if x.dim() == 3:
        x = x[:, None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1) / (3.0 if relevance else 1.0)
    elif x.shape[1] != 3:
        x = x.sum(1, keepdim=True).expand(-1, 3, -1, -1) / 3.0
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _write_images(path: Path, expl: Any, indices: list[int], dataset: Any,
                  size: tuple[int, int], h5py: Any) -> None:
    paths = [expl[i]["path"] for i in indices[:1]]
    if dataset is None and not (paths and paths[0]):
        raise RelpropError("the ViRelAy project needs the images: pass dataset= (the Dataset "
                           "that was explained), or explain a folder of image files")
    with h5py.File(path, "w") as f:
        data = f.create_dataset("data", (max(indices) + 1, *size, 3), dtype=np.uint8)
        label = f.create_dataset("label", (max(indices) + 1,), dtype=np.int64)
        for i in indices:
            if dataset is not None:
                x, y = dataset[i]
                x = torch.as_tensor(x).float()
            else:
                x, y = _image(expl[i]["path"], size), expl[i]["label"]
            if tuple(x.shape[-2:]) != size:
                x = torch.nn.functional.interpolate(x[None] if x.dim() == 3 else x[None, None],
                                                    size=size, mode="bilinear")[0]
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:  # normalised input: shown stretched to [0, 1]
                x = (x - lo) / max(hi - lo, 1e-12)
            data[i] = (_hwc(x[None])[0] * 255).round().clip(0, 255).astype(np.uint8)
            label[i] = int(y)


def _image(path: str, size: tuple[int, int]) -> Tensor:
    from ..visualize import optional

    image = optional("PIL.Image").open(path).convert("RGB").resize(size[::-1])
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _yaml(name: str, model: str, width: int, height: int, method: str, strategy: str) -> str:
    q = json.dumps  # a JSON string is a valid YAML scalar
    return "\n".join([
        "project:",
        f"  name: {q(name)}",
        f"  model: {q(model)}",
        "  label_map: label-map.json",
        "  dataset:",
        f"    name: {q(name)}",
        "    type: hdf5",
        "    path: dataset.h5",
        f"    input_width: {width}",
        f"    input_height: {height}",
        "    up_sampling_method: none",
        "    down_sampling_method: none",
        "  attributions:",
        f"    attribution_method: {q(method)}",
        f"    attribution_strategy: {strategy}",
        "    sources:",
        "      - attribution.h5",
        "  analyses:",
        "    - analysis_method: spectral",
        "      sources:",
        "        - spray.h5",
        ""])
