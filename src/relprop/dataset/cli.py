"""`relprop explain-dataset`: a folder of images (or an ImageFolder tree) to shards.

Model, weights and image reading are those of `relprop explain` (relprop.loading).
Under torchrun every rank runs this same command; rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

from ..errors import RelpropError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain-dataset", help="explain every image of a folder into resumable shards",
        description="Explain every image of a folder (flat, or one sub-folder per class "
        "like ImageFolder) into safetensors shards plus manifest.json. Running it again "
        "resumes; under torchrun the ranks share the work.")
    p.add_argument("folder", help="folder of images, or of class sub-folders of images")
    p.add_argument("--model", required=True,
                   help="torchvision architecture name (e.g. resnet50) or 'module:callable'")
    p.add_argument("--weights", help="state_dict file (torch.save) to load into the model")
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
    p.add_argument("--size", type=int, default=224,
                   help="resize/crop images to this side (0: keep as they are)")
    p.add_argument("--no-normalize", action="store_true",
                   help="feed pixels in [0, 1] instead of ImageNet-normalised values")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: Namespace) -> None:
    from ..loading import load_model
    from .images import ImageFiles
    from .run import explain_dataset

    target: int | str = args.target
    if target not in ("pred", "label"):
        if not str(target).isdigit():
            raise RelpropError(f"--target {target!r}: use 'pred', 'label' or a class index")
        target = int(target)
    dataset = ImageFiles(args.folder, size=args.size or None, normalize=not args.no_normalize)
    if target == "label" and not dataset.classes:
        raise RelpropError(f"--target label needs class sub-folders in {args.folder}")
    model = load_model(args.model, args.weights)
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
