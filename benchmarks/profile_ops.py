"""Where the time goes: torch.profiler's top operators for one method on one model.

    python benchmarks/profile_ops.py --model resnet50 --method relprop:epsilon_gamma_box
    python benchmarks/profile_ops.py --model resnet50 --method gradient

Methods are named as in bench_speed.py. The table is sorted by self CPU time, so
convolutions (the FLOP floor) and element-wise passes (overhead) stand apart.
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_speed import build, method_fn
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--method", default="relprop:epsilon_gamma_box")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--memory", action="store_true", help="also profile memory per operator")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    fn = method_fn(model, args.method, x)
    fn()  # warm-up: caches and the allocator
    with profile(activities=[ProfilerActivity.CPU], profile_memory=args.memory) as prof:
        fn()
    key = "self_cpu_memory_usage" if args.memory else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
