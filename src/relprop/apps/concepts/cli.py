"""`relprop collect-concepts FOLDER` (reference samples over a folder of images) and
`relprop concepts IMAGE` (the concept atlas of one image). Models, weights and
preprocessing are those of `relprop explain` (relprop.apps.loading)."""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

from ...errors import RelpropError
from ..dataset_cli import folder_command


def add_parsers(sub: argparse._SubParsersAction,
                model_options: Callable[[argparse.ArgumentParser, bool], None]) -> None:
    c = folder_command(
        sub, model_options, "collect-concepts",
        help="reference samples per channel over a folder of images",
        description="One pass over a folder of images (flat or one sub-folder per class): "
        "per channel of each layer, the samples with the most relevance (sum and max over "
        "positions) and activation. Resumable; under torchrun the ranks share the work.")
    c.add_argument("--layers", nargs="+", required=True,
                   help="layers by module path (features.28) or graph node name")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--n", type=int, default=40, help="samples kept per channel (40)")
    c.add_argument("--composite", default="epsilon_plus", help="composite (epsilon_plus)")
    c.add_argument("--target", default="pred",
                   help="'pred' (predicted class), 'label' (the class folder) or a class index")
    c.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    c.add_argument("--workers", type=int, default=2, help="DataLoader processes (2)")
    c.add_argument("--shard-size", type=int, default=256, help="samples per shard (256)")
    c.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU, else cpu)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    a = sub.add_parser(
        "concepts", help="the concept atlas of an image (HTML)",
        description="Which concepts (channels) of a layer carry the prediction for an image, "
        "where each is relevant, its reference samples (with --references) and its "
        "attribution graph (with --lower): one self-contained HTML page.")
    a.add_argument("image", type=Path, help="an image file")
    model_options(a, True)
    a.add_argument("--layer", required=True, help="the layer whose channels are the concepts")
    a.add_argument("--references", type=Path, help="a collect-concepts folder")
    a.add_argument("--lower", nargs="*", default=[], help="lower layers for the graphs")
    a.add_argument("--top", type=int, default=6, help="concepts shown (6)")
    a.add_argument("--n-refs", type=int, default=6, help="reference samples per concept (6)")
    a.add_argument("--composite", default="epsilon_plus", help="composite (epsilon_plus)")
    a.add_argument("--target", default="pred", help="'pred' or a class index")
    a.add_argument("--out", type=Path, default=Path("relprop-out"), help="output folder")


def run_collect(args: Namespace) -> None:
    from ...concepts.collect import collect
    from ..dataset_cli import load_folder

    model, dataset, target = load_folder(args)
    low, high = dataset.bounds
    summary = collect(model, dataset, args.layers, args.out, args.composite, n=args.n,
                      target=target, batch_size=args.batch_size, num_workers=args.workers,
                      shard_size=args.shard_size, device=args.device,
                      progress=not args.quiet, model_name=args.model, low=low, high=high)
    print(f"collected {summary.samples_written} images ({len(summary.shards_written)} shards "
          f"written, {len(summary.shards_skipped)} found finished) in {summary.seconds:.1f} s "
          f"into {args.out}", file=sys.stderr)


def run_atlas(args: Namespace) -> None:
    from ...concepts.references import load as load_references
    from ...explain import Explainer
    from ..explain_cli import preprocessing_for
    from ..loading import load
    from .atlas import atlas

    if not args.image.is_file():
        raise RelpropError(f"no such image: {args.image}")
    loaded = load(args.model, args.weights)
    prep = preprocessing_for(loaded, args)
    pixels = prep.read(args.image)
    x, low, high = prep.batch([pixels])
    explainer = Explainer(loaded.model, args.composite, low=low, high=high)
    refs = reader = None
    if args.references is not None:
        refs = load_references(args.references)

        def reader(i: int):  # the reference image as the model sees it, and its pixels
            path = refs.path(i)
            if path is None:
                raise RelpropError(f"{args.references} holds no image paths")
            p = prep.read(Path(path))
            xi, _, _ = prep.batch([p])
            return xi, _uint8(p)

    target = None if args.target == "pred" else int(args.target)
    page = atlas(explainer, x, args.out / f"{args.image.stem}_concepts.html", layer=args.layer,
                 target=target, top=args.top, references=refs, reader=reader,
                 n_refs=args.n_refs, lower=args.lower, class_names=loaded.categories,
                 image=_uint8(pixels))
    print(f"wrote {page}", file=sys.stderr)


def _uint8(pixels):
    """(H, W[, C]) floats in [0, 1] as an (H, W, 3) uint8 picture."""
    import numpy as np

    p = np.asarray(pixels)
    if p.ndim == 3 and p.shape[2] == 1:
        p = p[..., 0]
    if p.ndim == 2:
        p = np.stack([p] * 3, -1)
    return (p * 255).round().clip(0, 255).astype(np.uint8)
