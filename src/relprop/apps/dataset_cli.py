"""`relprop explain-dataset`: a folder of images (or an ImageFolder tree) to shards.

Model, weights and preprocessing are those of `relprop explain` (relprop.apps.loading:
torchvision names with --weights DEFAULT, timm:, hf:, module:callable, state_dict files).
Under torchrun every rank runs this same command; rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RelpropError

if TYPE_CHECKING:
    from ..dataset.images import ImageFiles


def add_parser(sub: argparse._SubParsersAction,
               model_options: Callable[[argparse.ArgumentParser, bool], None]) -> None:
    """The subcommand, with the --model / --weights / --size / --no-normalize options of
    `relprop explain` (model_options adds them)."""
    p = folder_command(
        sub, model_options, "explain-dataset",
        help="explain every image of a folder into resumable shards",
        description="Explain every image of a folder (flat, or one sub-folder per class "
        "like ImageFolder) into safetensors shards plus manifest.json. Running it again "
        "resumes; under torchrun the ranks share the work.")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    p.add_argument("--composite", default="epsilon_gamma_box",
                   help="composite name (default epsilon_gamma_box)")
    p.add_argument("--target", default="pred",
                   help="'pred' (predicted class), 'label' (the class folder) or a class index")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader processes reading images (default 2)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--store", default="whole",
                   help="whole | channels (summed) | pool:K (sums over KxK blocks) | "
                   "channels,pool:K")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"],
                   help="relevance on disk (default float32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def folder_command(sub: argparse._SubParsersAction,
                   model_options: Callable[[argparse.ArgumentParser, bool], None], name: str,
                   **kw: str) -> argparse.ArgumentParser:
    """A subcommand over a folder of images, with the folder and model options load_folder
    reads (--target is added by each command, where its --help lists it)."""
    p = sub.add_parser(name, **kw)
    p.add_argument("folder", help="folder of images, or of class sub-folders of images")
    model_options(p, True)
    return p


def load_folder(args: Namespace) -> tuple[Any, ImageFiles, int | str]:
    """The model, the image folder and the target (--target) of a command over a folder
    (explain-dataset, collect-concepts), loaded as `relprop explain` loads them, so the
    commands agree on models, preprocessing and what a target may be."""
    from ..dataset.images import ImageFiles
    from .explain_cli import preprocessing_for
    from .loading import load

    target: int | str = args.target
    if target not in ("pred", "label"):
        if not str(target).isdigit():
            raise RelpropError(f"--target {target!r}: use 'pred', 'label' or a class index")
        target = int(target)
    loaded = load(args.model, args.weights)
    dataset = ImageFiles(args.folder, preprocessing=preprocessing_for(loaded, args))
    if target == "label" and not dataset.classes:
        raise RelpropError(f"--target label needs class sub-folders in {args.folder}")
    return loaded.model, dataset, target


def run(args: Namespace) -> None:
    from ..dataset.run import explain_dataset

    model, dataset, target = load_folder(args)
    low, high = dataset.bounds
    summary = explain_dataset(
        model, dataset, args.out, args.composite, target=target, batch_size=args.batch_size,
        num_workers=args.workers, shard_size=args.shard_size, store=args.store,
        dtype=args.dtype, device=args.device, progress=not args.quiet, model_name=args.model,
        low=low, high=high)
    if summary.manifest is not None:
        who = f"rank 0 of {summary.world_size} " if summary.world_size > 1 else ""
        print(f"{who}explained {summary.samples_written} images ("
              f"{len(summary.shards_written)} shards written, {len(summary.shards_skipped)} "
              f"found finished) in {summary.seconds:.1f} s; manifest: {summary.manifest}",
              file=sys.stderr)
