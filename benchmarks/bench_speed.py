"""Time and peak memory of relprop against the plain input gradient, Zennit and Captum.

Every (model, batch, method) cell runs in its own subprocess, so peak memory
(ru_maxrss above the resident size just before the first explanation) is not
polluted by earlier cells. Time is the median of several runs after one warm-up.
Ratios are to the plain input gradient of the same model and batch, measured
in the same invocation.

    python benchmarks/bench_speed.py                       # VGG16, ResNet18, batch 8
    python benchmarks/bench_speed.py --models vgg16 resnet50 efficientnet_b0 --batches 1 8 \
        --markdown docs/benchmarks.md
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

RELPROP = ["relprop:epsilon", "relprop:epsilon_gamma_box", "relprop:epsilon_plus",
           "relprop:epsilon_alpha2_beta1", "relprop:lrp0",
           "relprop10:epsilon_gamma_box", "relprop10:epsilon_gamma_box/separate"]
PEERS = ["zennit:EpsilonGammaBox", "zennit:EpsilonPlusFlat", "captum:LRP"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(model_name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    return model


def method_fn(model, method: str, x):
    import torch

    kind, _, name = method.partition(":")
    target = 3
    if kind == "gradient":
        def run():
            xg = x.detach().requires_grad_()
            out = model(xg)
            (g,) = torch.autograd.grad(out[:, target].sum(), xg)
            return g * xg
        return run
    if kind == "relprop":
        import relprop

        explainer = relprop.Explainer(model, composite=name, low=-3.0, high=3.0)
        return lambda: explainer(x, target=target).relevance
    if kind == "relprop10":  # ten classes: one call, or ten calls (the "x ten calls" ratio)
        import relprop

        composite, _, mode = name.partition("/")
        explainer = relprop.Explainer(model, composite=composite, low=-3.0, high=3.0)
        classes = list(range(10))
        if mode == "separate":
            return lambda: [explainer(x, target=t).relevance for t in classes]
        return lambda: explainer(x, target=classes).relevance
    if kind == "zennit":
        from zennit import composites as zc
        from zennit.attribution import Gradient
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer

        canon = [ResNetCanonizer()] if "resnet" in model.__class__.__name__.lower() else [
            VGGCanonizer()]
        kw = {"low": torch.full_like(x, -3.0), "high": torch.full_like(x, 3.0)} \
            if name == "EpsilonGammaBox" else {}
        composite = getattr(zc, name)(canonizers=canon, **kw)

        def run():
            with Gradient(model=model, composite=composite) as attributor:
                out, rel = attributor(x, torch.eye(1000)[[target] * len(x)])
            return rel
        return run
    if kind == "captum":
        from captum.attr import LRP

        lrp = LRP(model)
        return lambda: lrp.attribute(x.detach().clone().requires_grad_(), target=target)
    raise ValueError(method)


def worker(model_name: str, method: str, batch: int, repeats: int, size: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build(model_name)
    x = torch.randn(batch, 3, size, size)
    t0 = time.perf_counter()
    fn = method_fn(model, method, x)
    setup = time.perf_counter() - t0
    base = rss_bytes()
    fn()  # warm-up, and the peak-memory run
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"time": statistics.median(times), "mem": max(peak - base, 0), "setup": setup}


def run_cell(model: str, method: str, batch: int, repeats: int, size: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", model, method, str(batch), str(repeats),
           str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": err[:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, model, method, batch, repeats, size = sys.argv
        print(json.dumps(worker(model, method, int(batch), int(repeats), int(size))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    p.add_argument("--batches", nargs="+", type=int, default=[8])
    p.add_argument("--methods", nargs="+", default=["gradient", *RELPROP, *PEERS])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--markdown", help="also write the table as markdown to this file")
    p.add_argument("--append", action="store_true", help="append rows to --markdown")
    args = p.parse_args()
    methods = args.methods if "gradient" in args.methods else ["gradient", *args.methods]
    header = ("| model | batch | method | time (s) | x gradient | extra peak mem (MB) | "
              "x gradient | setup (s) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    print(header)
    for model in args.models:
        for batch in args.batches:
            ref = None
            for method in methods:
                r = run_cell(model, method, batch, args.repeats, args.size)
                if "error" in r:
                    line = f"| {model} | {batch} | {method} | failed: {r['error']} | | | | |"
                else:
                    if method == "gradient":
                        ref = r
                    tr = r["time"] / ref["time"] if ref else float("nan")
                    mr = r["mem"] / ref["mem"] if ref and ref["mem"] else float("nan")
                    line = (f"| {model} | {batch} | {method} | {r['time']:.3f} | {tr:.2f}x | "
                            f"{r['mem'] / 2**20:.0f} | {mr:.2f}x | {r['setup']:.2f} |")
                print(line, flush=True)
                lines.append(line)
    if args.markdown:
        with open(args.markdown, "a" if args.append else "w") as f:
            if not args.append:
                f.write("# Benchmark: relprop vs plain gradient, Zennit, Captum\n\n")
            f.write(f"\nCPU, {os.environ.get('BENCH_THREADS', '2')} threads, input "
                    f"{args.size}x{args.size}, median of {args.repeats} runs after a warm-up; "
                    f"command: `python benchmarks/bench_speed.py {' '.join(sys.argv[1:])}`\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
