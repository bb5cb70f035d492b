"""Time and peak memory of relprop against the plain input gradient, Zennit and Captum.

Peak memory: every (model, batch, method) cell runs once in its own subprocess,
so its peak (ru_maxrss above the resident size just before the first
explanation, weight caches included) is not polluted by other cells. Time: one
subprocess per (model, batch) builds every method, warms each up once, then
runs them in turn, round after round, and reports each method's median, so
that the machine's slow and fast spells fall on all methods alike. "user CPU"
is the arithmetic (user-space CPU time) and "sys s" the median kernel CPU time
per call: mostly page faults on freshly mapped memory, a cost that grows with
allocation, not with arithmetic, and noisy on large maps. Ratios are to the
plain input gradient of the same model and batch, measured in the same run.

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


def setup_torch() -> None:
    """Thread count and denormals, the same in every worker. Randomly initialised
    EfficientNet-B0 shrinks its activations to ~1e-14 logits, whose relevance and
    gradients fall into denormal numbers; CPUs handle those in microcode, dozens of
    times slower, which times the denormals, not the method. Flushing them to zero
    (torch.set_flush_denormal) applies to every method alike."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_flush_denormal(True)


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
        return lambda: explainer(x, target=[classes]).relevance  # (1, K): K maps per sample
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


def memory_worker(model_name: str, method: str, batch: int, size: int) -> dict:
    import torch

    setup_torch()
    model = build(model_name)
    x = torch.randn(batch, 3, size, size)
    t0 = time.perf_counter()
    fn = method_fn(model, method, x)
    setup = time.perf_counter() - t0
    base = rss_bytes()
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mem": max(peak - base, 0), "setup": setup}


def time_worker(model_name: str, methods: list[str], batch: int, repeats: int,
                size: int, stat: str = "median") -> dict:
    import torch

    setup_torch()
    model = build(model_name)
    x = torch.randn(batch, 3, size, size)
    fns, results = {}, {}
    for method in methods:
        try:
            fns[method] = method_fn(model, method, x)
            fns[method]()  # warm-up: caches, allocator
        except Exception as exc:  # a peer that cannot explain this model
            fns.pop(method, None)
            results[method] = {"error": f"{type(exc).__name__}: {exc}"[:80]}
    wall: dict[str, list[float]] = {m: [] for m in fns}
    sys_time: dict[str, list[float]] = {m: [] for m in fns}
    user_time: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for method, fn in fns.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            fn()
            wall[method].append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            sys_time[method].append(r1.ru_stime - r0.ru_stime)
            user_time[method].append(r1.ru_utime - r0.ru_utime)
    pick = min if stat == "min" else statistics.median
    for method in fns:
        results[method] = {"time": pick(wall[method]), "sys": pick(sys_time[method]),
                           "user": pick(user_time[method])}
    return results


def run_worker(*args: str) -> dict:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": err[:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        _, _, model, method, batch, size = sys.argv
        print(json.dumps(memory_worker(model, method, int(batch), int(size))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--time-worker":
        _, _, model, batch, repeats, size, stat, *methods = sys.argv
        print(json.dumps(time_worker(model, methods, int(batch), int(repeats), int(size),
                                     stat)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    p.add_argument("--batches", nargs="+", type=int, default=[8])
    p.add_argument("--methods", nargs="+", default=["gradient", *RELPROP, *PEERS])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="per method over the rounds: median, or min (robust where other "
                        "jobs share the machine: interference only ever adds time)")
    p.add_argument("--markdown", help="also write the table as markdown to this file")
    p.add_argument("--append", action="store_true", help="append rows to --markdown")
    args = p.parse_args()
    methods = args.methods if "gradient" in args.methods else ["gradient", *args.methods]
    header = ("| model | batch | method | time (s) | x gradient | user CPU x gradient | sys s | "
              "extra peak mem (MB) | x gradient | setup (s) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    print(header)
    for model in args.models:
        for batch in args.batches:
            times = run_worker("--time-worker", model, str(batch), str(args.repeats),
                               str(args.size), args.stat, *methods)
            ref = None
            for method in methods:
                t = times.get(method, times)
                m = run_worker("--memory-worker", model, method, str(batch), str(args.size))
                if "error" in t or "error" in m:
                    err = t.get("error") or m.get("error")
                    line = f"| {model} | {batch} | {method} | failed: {err} | | | | | | |"
                else:
                    r = {**t, **m}
                    if method == "gradient":
                        ref = r
                    tr = r["time"] / ref["time"] if ref else float("nan")
                    mr = r["mem"] / ref["mem"] if ref and ref["mem"] else float("nan")
                    ur = r["user"] / ref["user"] if ref and ref["user"] else float("nan")
                    line = (f"| {model} | {batch} | {method} | {r['time']:.3f} | {tr:.2f}x | "
                            f"{ur:.2f}x | {r['sys']:.2f} | {r['mem'] / 2**20:.0f} | {mr:.2f}x | "
                            f"{r['setup']:.2f} |")
                print(line, flush=True)
                lines.append(line)
    if args.markdown:
        text = (f"\nCPU, {os.environ.get('BENCH_THREADS', '2')} threads, denormals flushed to "
                f"zero, input {args.size}x{args.size}, {args.stat} of {args.repeats} interleaved "
                "rounds after a warm-up; "
                f"command: `python benchmarks/bench_speed.py {' '.join(sys.argv[1:])}`\n\n"
                + "\n".join(lines) + "\n")
        write_section(args.markdown, text, append=args.append)


BEGIN = "<!-- bench_speed.py: begin (rewritten by --markdown; edit outside the markers) -->"
END = "<!-- bench_speed.py: end -->"


def write_section(path: str, text: str, append: bool) -> None:
    """Put `text` between this script's markers in `path`, replacing what was there
    (append=True: after it); the rest of the file (other sections) is left as it is.
    Without markers the section goes at the end of the file."""
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmark: relprop vs plain gradient, Zennit, Captum\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        old, tail = rest.split(END, 1)
    else:
        head, old, tail = doc.rstrip("\n") + "\n\n", "", "\n"
    body = (old.rstrip("\n") + "\n" if append else "\n") + text
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + body + "\n" + END + tail)

if __name__ == "__main__":
    main()
