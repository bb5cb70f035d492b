"""explain_dataset against a plain loop of Explainer(...)(x), and bytes per sample on disk.

Synthetic JPEGs (256 px, cropped to 224) in a temporary ImageFolder, ResNet50 with random
weights. "plain loop": the images decoded beforehand, then only `explainer(x)` per batch
(the explanation itself). "pipeline": explain_dataset end to end, reading and decoding in
DataLoader workers and writing shards in a background thread; "loop" leaves out the one-off
set-up (trace, weight fingerprint, manifest), as the plain loop does (both include the first,
cold batch of a fresh Explainer). Plain and pipeline runs alternate,
round after round, and each reports its median. Bytes per sample: the shard files (relevance,
output, target, label, index) per stored sample, for each storage option.

    python benchmarks/bench_dataset.py                         # 64 images, batch 8
    python benchmarks/bench_dataset.py --torchrun --markdown docs/benchmarks.md --append
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

import relprop
from relprop.dataset import ImageFiles, explain_dataset
from relprop.dataset.manifest import model_fingerprint

STORES = [("whole", "float32"), ("whole", "float16"), ("channels", "float32"),
          ("channels", "float16"), ("pool:8", "float16"), ("channels,pool:8", "float16")]


def make_folder(root: Path, n: int, side: int = 256, classes: int = 4) -> Path:
    """n smooth random JPEGs (so that they compress like photos), spread over classes."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        img.save(folder / f"img{i:05d}.jpg", quality=90)
    return root


def plain_loop(model, dataset, batches: list[torch.Tensor], composite: str
               ) -> tuple[float, float]:
    """A fresh Explainer (built untimed, as the pipeline's loop time leaves its build out),
    then explainer(x) over the decoded batches, first (cold) batch included."""
    explainer = relprop.Explainer(model, composite, low=dataset.bounds[0],
                                  high=dataset.bounds[1])
    start, cpu = time.perf_counter(), cpu_seconds()
    for x in batches:
        explainer(x)
    return time.perf_counter() - start, cpu_seconds() - cpu


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (DataLoader workers):
    the work done, which other people's jobs on a shared machine disturb less than wall."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def pipeline(model, dataset, out: Path, args, store: str, dtype: str
             ) -> relprop.dataset.RunSummary:
    low, high = dataset.bounds
    return explain_dataset(model, dataset, out, args.composite, batch_size=args.batch_size,
                           num_workers=args.workers, shard_size=args.shard_size, store=store,
                           dtype=dtype, progress=False, low=low, high=high)


def shard_bytes(out: Path, n: int) -> float:
    return sum(p.stat().st_size for p in out.glob("shard-*.safetensors")) / n


def torchrun_times(folder: Path, work: Path, args) -> list[tuple[str, float | None]]:
    """Wall time of the command line: one process (all threads) vs two (torchrun, gloo)."""
    weights = work / "resnet50.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    common = ["explain-dataset", str(folder), "--model", "resnet50", "--weights", str(weights),
              "--batch-size", str(args.batch_size), "--workers", str(args.workers),
              "--shard-size", str(args.shard_size), "--store", "channels", "--dtype",
              "float16", "--quiet"]
    threads = args.cores
    runs = [(f"1 process x {threads} threads", [sys.executable, "-m", "relprop"],
             threads),
            (f"torchrun 2 processes x {max(threads // 2, 1)} thread(s), gloo",
             [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
              "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
              str(_free_port()), "-m", "relprop"], max(threads // 2, 1))]
    out = []
    for i, (label, cmd, t) in enumerate(runs):
        env = dict(os.environ, OMP_NUM_THREADS=str(t), GLOO_SOCKET_IFNAME="lo")
        start = time.perf_counter()
        done = subprocess.run([*cmd, *common, "--out", str(work / f"cli{i}")], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
        out.append((label, time.perf_counter() - start if done.returncode == 0 else None))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images for the throughput runs")
    p.add_argument("--store-n", type=int, default=8, help="images per storage option")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--composite", default="epsilon_gamma_box")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (median)")
    p.add_argument("--torchrun", action="store_true",
                   help="also time the command line in 1 process and in 2 under torchrun")
    p.add_argument("--cores", type=int, default=2,
                   help="threads of the 1-process run, split over the 2 under torchrun")
    p.add_argument("--markdown", help="also write the tables as markdown to this file")
    p.add_argument("--append", action="store_true", help="append to --markdown")
    args = p.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = make_folder(work / "images", args.n)
        dataset = ImageFiles(folder)
        t = time.perf_counter()
        xs = [dataset[i][0] for i in range(args.n)]
        decode = (time.perf_counter() - t) / args.n
        batches = [torch.stack(xs[i:i + args.batch_size])
                   for i in range(0, args.n, args.batch_size)]
        relprop.Explainer(model, args.composite, low=dataset.bounds[0],
                          high=dataset.bounds[1])(batches[0])  # process warm-up
        times: dict[str, list[float]] = {}
        steady: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        variants = [("whole", "float32"), ("channels", "float16")]
        for r in range(args.rounds):
            wall, cpu = plain_loop(model, dataset, batches, args.composite)
            times.setdefault("plain", []).append(wall)
            cpus.setdefault("plain", []).append(cpu)
            for store, dtype in variants:
                key = f"{store}/{dtype}"
                cpu = cpu_seconds()
                summary = pipeline(model, dataset, work / f"out-{r}-{store}", args, store,
                                   dtype)
                cpus.setdefault(key, []).append(cpu_seconds() - cpu)
                times.setdefault(key, []).append(summary.seconds)
                steady.setdefault(key, []).append(summary.loop_seconds)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s"
                                                  for k, v in times.items()), file=sys.stderr)
        t = time.perf_counter()
        relprop.Explainer(model, args.composite, low=dataset.bounds[0], high=dataset.bounds[1])
        build = time.perf_counter() - t
        t = time.perf_counter()
        model_fingerprint(model)
        fingerprint = time.perf_counter() - t
        plain = statistics.median(times["plain"])
        head = (f"ResNet50, 224 px, {args.composite}, batch {args.batch_size}, "
                f"{args.n} synthetic JPEGs, {torch.get_num_threads()} compute thread(s), "
                f"{args.workers} DataLoader worker(s), shards of {args.shard_size}, "
                f"{os.cpu_count()} CPUs shared, median of {args.rounds} alternating rounds; "
                f"decoding alone: {1000 * decode:.1f} ms/image")
        plain_cpu = statistics.median(cpus["plain"])
        lines += [head, "", "| run | time (s) | samples/s | x plain loop | CPU s (all "
                  "processes) | x plain loop |", "|---|---|---|---|---|---|",
                  f"| plain loop of Explainer(x) (decoded beforehand) | {plain:.2f} | "
                  f"{args.n / plain:.2f} | 1.00x | {plain_cpu:.2f} | 1.00x |"]
        for store, dtype in variants:
            key = f"{store}/{dtype}"
            c = statistics.median(cpus[key])
            for label, values, cpu_cells in (
                    (f"explain_dataset, store {key}, end to end", times[key],
                     f"{c:.2f} | {c / plain_cpu:.2f}x"),
                    (f"explain_dataset, store {key}, loop", steady[key], " | ")):
                s = statistics.median(values)
                lines.append(f"| {label} | {s:.2f} | {args.n / s:.2f} | {s / plain:.2f}x | "
                             f"{cpu_cells} |")
        lines += ["", f"Fixed costs per run, in the end-to-end times: building the Explainer "
                  f"{build:.2f} s, the weights' fingerprint {fingerprint:.2f} s, plus the "
                  "first batch after the DataLoader forks its workers (copy-on-write page "
                  "faults)."]
        lines += ["", f"Bytes per sample on disk ({args.store_n} images per option; "
                  "shards hold relevance, the 1000 logits, explained value, target, label, "
                  "index):", "",
                  "| store | dtype | relevance shape | relevance bytes | shard bytes/sample "
                  "| 50,000 samples |", "|---|---|---|---|---|---|"]
        small = ImageFiles(make_folder(work / "small", args.store_n))
        for store, dtype in STORES:
            out = work / f"store-{store}-{dtype}"
            pipeline(model, small, out, args, store, dtype)
            expl = relprop.load_explanations(out)
            rel = expl[0]["relevance"]
            per = shard_bytes(out, args.store_n)
            lines.append(f"| {store} | {dtype} | {tuple(rel.shape)} | "
                         f"{rel.numel() * rel.element_size():,} | {per:,.0f} | "
                         f"{per * 50_000 / 1e9:.2f} GB |")
        emit(lines, args, args.append)  # kept even if what follows fails
        if args.torchrun:
            rows = torchrun_times(folder, work, args)
            lines = ["", f"Command line end to end (process start-up included), {args.n} "
                     "images, store channels/float16:", "", "| run | wall (s) | samples/s |",
                     "|---|---|---|"]
            lines += [f"| {label} | {s:.1f} | {args.n / s:.2f} |" if s is not None
                      else f"| {label} | failed | |" for label, s in rows]
            emit(lines, args, True)


def emit(lines: list[str], args, append: bool) -> None:
    text = "\n".join(lines)
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "a" if append else "w") as f:
            f.write(("\n" if append and lines[0] else "") + text + "\n")


if __name__ == "__main__":
    main()
