"""Time and peak memory of the dataset-wide analysis (relprop.analysis.spray).

Two cases, each analysis in a fresh child process. Memory: the child's peak resident set
(VmHWM; it includes torch, numpy and the analysis libraries, about 0.9 GB here before any
data) and the peak of what Python and numpy allocate during the analysis (tracemalloc):

- mnist: 10,000 MNIST maps: the 5,000 shipped real digits and the same digits shifted one
  pixel right, explained with the planted CNN (explain_dataset, whole float32 maps), then
  SpRAy over all 10 classes (about 1,000 maps each), with and without t-SNE.
- imagenet: 5,000 ImageNet-size (3x224x224) inputs explained by a small convolutional
  model, stored pooled ("channels,pool:8", 28x28 float16 per map), all of one class: the
  worst case for SpRAy's per-class dense distance matrix (5,000 x 5,000).

The explanations are made once (explain_dataset, the same path torchrun spreads over
processes); only the analysis is measured. The analysis runs on one machine.

    python benchmarks/bench_analysis.py [--cases mnist imagenet] [--keep DIR] [--tsne]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def explain_mnist(out: Path) -> float:
    import relprop
    from relprop.apps.analyze.cheat_demo import planted_cnn
    from relprop.apps.analyze.planted import PlantedDigits
    from relprop.apps.datasets import load_mnist

    x, y = load_mnist("all")
    x = torch.cat([x, torch.roll(x, 1, dims=3)])
    y = torch.cat([y, y])
    data = PlantedDigits(x, y, torch.zeros(len(y), dtype=torch.bool))
    start = time.perf_counter()
    relprop.explain_dataset(planted_cnn(), data, out, "epsilon_gamma_box", target="label",
                            batch_size=500, shard_size=1000, progress=False, low=0.0, high=1.0)
    return time.perf_counter() - start


class Images(torch.utils.data.Dataset):
    """n smooth random 3x224x224 images (made on the fly from a seed), label 0."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        small = torch.rand(3, 28, 28, generator=g)
        return nn.functional.interpolate(small[None], size=224, mode="bilinear")[0], 0


def explain_imagenet(out: Path, n: int) -> float:
    import relprop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4, padding=3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(256, 10)).eval()
    start = time.perf_counter()
    relprop.explain_dataset(model, Images(n), out, "epsilon_plus", target=0, batch_size=100,
                            shard_size=500, store="channels,pool:8", dtype="float16",
                            progress=False)
    return time.perf_counter() - start


def vm(field: str) -> float:
    """A /proc/self/status size in MB (VmHWM: this process image's peak resident set; unlike
    ru_maxrss it does not carry the parent's peak over fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def analyse(folder: str, tsne: bool) -> dict:
    """In the child: SpRAy over every class; time, peak RSS and peak numpy/Python heap."""
    import tracemalloc

    import corelay.pipeline.spectral  # noqa: F401  (imports are not the analysis)
    import sklearn.manifold  # noqa: F401

    from relprop.analysis import spray

    base = vm("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    result = spray(folder, tsne=tsne)
    seconds = time.perf_counter() - start
    heap = tracemalloc.get_traced_memory()[1] / 2**20
    sizes = [len(a.indices) for a in result.classes.values()]
    return {"seconds": seconds, "peak_rss_mb": vm("VmHWM"), "rss_before_mb": base,
            "heap_mb": heap, "classes": len(sizes), "largest_class": max(sizes),
            "samples": sum(sizes)}


def child(folder: str, tsne: bool) -> dict:
    here = str(Path(__file__).parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import bench_analysis as b; "
            f"print(json.dumps(b.analyse({folder!r}, {tsne!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["mnist", "imagenet"])
    parser.add_argument("--imagenet-n", type=int, default=5000)
    parser.add_argument("--keep", type=Path, help="keep the explanations in this folder")
    parser.add_argument("--tsne", action="store_true", help="also time the runs with t-SNE")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-analysis-"))
    rows = []
    for case in args.cases:
        folder = root / case
        if not (folder / "manifest.json").exists():
            made = (explain_mnist(folder) if case == "mnist"
                    else explain_imagenet(folder, args.imagenet_n))
            print(f"{case}: explained in {made:.1f} s", file=sys.stderr)
        for tsne in (False, True) if args.tsne else (False,):
            r = child(str(folder), tsne)
            rows.append((case, tsne, r))
            print(f"{case} (t-SNE {'on' if tsne else 'off'}): {r['samples']} maps in "
                  f"{r['classes']} classes (largest {r['largest_class']}): {r['seconds']:.1f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['rss_before_mb']:.0f} MB after "
                  f"imports), peak heap {r['heap_mb']:.0f} MB", flush=True)
    print("\n| case | maps | classes (largest) | t-SNE | time | peak RSS | peak heap |")
    print("|---|---|---|---|---|---|---|")
    for case, tsne, r in rows:
        print(f"| {case} | {r['samples']} | {r['classes']} ({r['largest_class']}) | "
              f"{'on' if tsne else 'off'} | {r['seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB "
              f"| {r['heap_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
