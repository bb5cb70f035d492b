"""`relprop explain`: images in, heatmaps, overlays and scores out."""

from __future__ import annotations

import csv
import json
import re
import sys
from argparse import Namespace

import torch

from ..dataset.images import image_files
from ..errors import RelpropError
from ..explain import Explainer
from ..progress import Progress
from ..visualize import heatmap, overlay, relevance_figure, save_png
from .loading import LoadedModel, Preprocessing, load, plain_preprocessing


def parse_target(spec: str) -> tuple[str, int]:
    """'pred' -> ("pred", 1); '3' -> ("class", 3); 'top5' -> ("top", 5)."""
    if spec == "pred":
        return "pred", 1
    if spec.isdigit():
        return "class", int(spec)
    m = re.fullmatch(r"top(\d+)", spec)
    if m and int(m.group(1)) >= 1:
        return "top", int(m.group(1))
    raise RelpropError(f"--target {spec!r}: use 'pred', a class index, or 'topK' (e.g. top3)")


def preprocessing_for(loaded: LoadedModel, args: Namespace) -> Preprocessing:
    """What the weights declare, else --size / --no-normalize; says which options it ignores."""
    declared = loaded.preprocessing
    if declared is None:
        size = 224 if args.size is None else args.size
        return plain_preprocessing(size or None, normalize=not args.no_normalize)
    ignored = [opt for opt, given in (("--size", args.size is not None),
                                      ("--no-normalize", args.no_normalize)) if given]
    if ignored:
        print(f"relprop: {' and '.join(ignored)} ignored: {declared.source} declares its "
              "preprocessing", file=sys.stderr)
    return declared


def class_name(categories: list[str] | None, cls: int) -> str:
    return categories[cls] if categories is not None and 0 <= cls < len(categories) else ""


def run_explain(args: Namespace) -> None:
    mode, k = parse_target(args.target)
    files = image_files(args.images)
    loaded = load(args.model, args.weights)
    model, names = loaded.model, loaded.categories
    prep = preprocessing_for(loaded, args)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    explainer = None
    bar = Progress(len(files), enabled=True)
    for start in range(0, len(files), args.batch_size):
        batch_files = files[start:start + args.batch_size]
        images = [prep.read(f) for f in batch_files]
        x, low, high = prep.batch(images)
        if explainer is None:
            explainer = Explainer(model, composite=args.composite, low=low, high=high)
        with torch.no_grad():
            logits = model(x)
        if logits.dim() != 2:
            raise RelpropError(f"the model's output has shape {tuple(logits.shape)}; "
                               "expected (batch, classes)")
        if mode == "class" and not 0 <= k < logits.shape[1]:
            raise RelpropError(f"--target {k} is out of range: the model has "
                               f"{logits.shape[1]} classes")
        targets = (torch.full((len(x), 1), k) if mode == "class"
                   else logits.topk(k, dim=1).indices)
        expl = explainer(x, target=targets)
        for i, f in enumerate(batch_files):
            for j in range(targets.shape[1]):
                cls = int(targets[i, j])
                rel = expl.relevance[i, j]
                stem = f"{f.stem}_class{cls}"
                save_png(heatmap(rel, mode="percentile"), args.out / f"{stem}_heatmap.png")
                save_png(overlay(images[i], rel), args.out / f"{stem}_overlay.png")
                rows.append({"image": str(f), "target": cls,
                             "class_name": class_name(names, cls), "rank": j + 1,
                             "logit": float(logits[i, cls]),
                             "relevance_sum": float(rel.sum()),
                             "explained": float(expl.explained[i, j])})
            # one titled picture per image: the input and a heatmap per target
            relevance_figure(expl.relevance[i:i + 1], targets[i:i + 1],
                             expl.explained[i:i + 1], class_names=names,
                             images=images[i:i + 1]).savefig(
                args.out / f"{f.stem}_explained.png", dpi=100)
        bar.update(len(batch_files))
    bar.close()
    (args.out / "scores.json").write_text(json.dumps(rows, indent=1))
    with open(args.out / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} heatmaps and overlays, {len(files)} titled pictures, "
          f"scores.json and scores.csv to {args.out.resolve()}")
