"""Concept relevance: time and peak memory of 64 conditional heatmaps of one VGG16 image
(relprop, zennit-crp 0.6.0's CondAttribution.generate) against one explanation, and of
reference collection (three layers recorded) against explaining the same images.

Every cell runs in its own subprocess: peak memory is ru_maxrss above the resident size
just before the first call (after a warm-up call); time is the median of `--rounds` calls,
as wall-clock seconds and as process CPU seconds (the arithmetic, less sensitive to other
jobs on a shared machine). For collect, the loop only (reading, explaining, writing), not
the set-up (tracing, fingerprinting the weights).

    python benchmarks/bench_concepts.py                 # CPU, 2 threads, 224 px
    python benchmarks/bench_concepts.py --device cuda --threads 16 --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LAYER, CHANNELS = "features.28", list(range(64))
COLLECT_LAYERS = ["features.14", "features.21", "features.28"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cell(name: str, size: int, rounds: int, device: str, threads: int) -> dict:
    """Runs one cell in this process: warm-up, then `rounds` timed calls."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval().to(device)
    x = torch.randn(1, 3, size, size, device=device)
    kind, _, arg = name.partition(":")
    if kind == "explain":
        import relprop

        explainer = relprop.Explainer(model, "epsilon_plus")
        n = int(arg or 1)
        xs = torch.randn(n, 3, size, size, device=device)

        def run():
            return explainer(xs, target=3).relevance
    elif kind == "relprop":
        import relprop
        import relprop.concepts as rc

        explainer = relprop.Explainer(model, "epsilon_plus")

        def run():
            return rc.explain(explainer, x, 3, condition={LAYER: CHANNELS},
                              concept_batch=int(arg)).relevance
    elif kind == "crp":
        from crp.attribution import CondAttribution
        from zennit.composites import EpsilonPlus

        attribution = CondAttribution(model, no_param_grad=True)
        conditions = [{"y": [3], LAYER: [c]} for c in CHANNELS]

        def run():
            data = x.clone().requires_grad_(True)
            return [a.heatmap for a in attribution.generate(
                data, conditions, EpsilonPlus(), batch_size=int(arg), verbose=False)]
    elif kind == "collect":
        import tempfile

        from torch.utils.data import TensorDataset

        import relprop.concepts as rc

        n = int(arg)
        data = TensorDataset(torch.randn(n, 3, size, size), torch.zeros(n, dtype=torch.long))
        folder = tempfile.mkdtemp()
        count = [0]

        def run():
            count[0] += 1
            return rc.collect(model, data, COLLECT_LAYERS, f"{folder}/{count[0]}",
                              "epsilon_plus", n=8, batch_size=n, shard_size=n,
                              device=device, progress=False, target=3).loop_seconds
    else:
        raise ValueError(name)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    run()
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = rss_bytes()
    times, cpu = [], []
    for _ in range(rounds):
        sync()
        t, c = time.perf_counter(), time.process_time()
        out = run()
        sync()
        wall, work = time.perf_counter() - t, time.process_time() - c
        if kind == "collect":  # the loop only: scale the CPU time alike
            work, wall = work * out / wall, out
        times.append(wall)
        cpu.append(work)
        del out
    peak = (torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss)
    return {"name": name, "seconds": statistics.median(times),
            "cpu_seconds": statistics.median(cpu), "peak_bytes": max(peak, 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cells", nargs="*", default=[
        "explain:1", "relprop:1", "relprop:8", "relprop:64", "crp:8", "crp:64",
        "explain:8", "collect:8"])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write a table here")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell, args.size, args.rounds, args.device, args.threads)))
        return
    results = {}
    for name in args.cells:
        proc = subprocess.run([sys.executable, __file__, "--cell", name, "--size",
                               str(args.size), "--rounds", str(args.rounds), "--device",
                               args.device, "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:<12} {r['seconds']:8.3f} s  {r['cpu_seconds']:8.3f} CPU s  "
              f"{r['peak_bytes'] / 2**20:8.0f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table(results, args))


def table(results: dict, args: argparse.Namespace) -> str:
    one = results.get("explain:1")
    batch = results.get("explain:8")
    rows = [f"VGG16, {args.size} px, {args.device}, {args.threads} threads, median of "
            f"{args.rounds}; ratios to one explanation (epsilon_plus) in the same run\n",
            "| work | time | CPU time | x one explanation (CPU time) | peak memory |",
            "|---|---|---|---|---|"]
    labels = {"explain:1": "one explanation (batch 1)",
              "relprop:1": "relprop, 64 maps, concept_batch=1",
              "relprop:8": "relprop, 64 maps, concept_batch=8",
              "relprop:64": "relprop, 64 maps, concept_batch=64",
              "crp:8": "zennit-crp generate, 64 maps, batch_size=8",
              "crp:64": "zennit-crp generate, 64 maps, batch_size=64",
              "explain:8": "explain 8 images (batch 8)",
              "collect:8": "collect 8 images, 3 layers (batch 8)"}
    for name, r in results.items():
        ref = batch if name in ("explain:8", "collect:8") else one
        ratio = f"{r['cpu_seconds'] / ref['cpu_seconds']:.2f}x" if ref else "-"
        rows.append(f"| {labels.get(name, name)} | {r['seconds']:.2f} s | "
                    f"{r['cpu_seconds']:.2f} s | {ratio} | {r['peak_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
