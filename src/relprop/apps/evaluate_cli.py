"""`relprop evaluate`: how faithful are the explanations of a model on its images?

Region perturbation (Samek et al. 2017): regions are removed most relevant first
(MoRF) and least relevant first (LeRF), replaced by uniform noise; AOPC = mean drop
of the explained logit along MoRF (higher = the explanation found what the model
uses), ABPC = LeRF area minus MoRF area. LRP composites against the plain gradient,
gradient x input and random maps. On the user's model and images (loaded as
`relprop explain` loads them), or, given neither, on real MNIST test digits with the
shipped CNN.
"""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import RelpropError
from ..evaluate import aopc, baselines, region_perturbation
from ..explain import Explainer
from ..visualize import heatmap, new_figure
from .datasets import load_mnist
from .report import figure_data_uri, image_grid_html, table_html, write_report
from .zoo import accuracy, mnist_cnn

COMPOSITES = ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]
BASELINES = ["gradient", "gradient_x_input", "random"]


def run_evaluate(out: Path, n: int = 500, patch_size: int = 4, seed: int = 0) -> dict:
    """The shipped MNIST CNN on n real test digits."""
    start = time.perf_counter()
    x, y = load_mnist("test")
    x, y = x[:n], y[:n]
    model = mnist_cnn()
    acc = accuracy(model, x, y)
    with torch.no_grad():
        target = model(x).argmax(1)
    pictures = [(img[0].numpy() * 255).astype("uint8") for img in x[:6]]
    titles = [f"label {int(y[i])}, pred {int(target[i])}" for i in range(len(pictures))]
    intro = (f"<p>MNIST CNN shipped with relprop, test accuracy {acc:.3f}; {n} real test "
             f"digits; regions of {patch_size}x{patch_size} pixels replaced by uniform noise; "
             "the explained output is the predicted class's logit.</p>")
    return _evaluate(model, x, target, 0.0, 1.0, patch_size, seed, 250, out,
                     "relprop: faithfulness on MNIST", intro, pictures, titles, start)


def run_evaluate_images(args: Namespace, seed: int = 0) -> dict:
    """The user's model (--model / --weights) on their images, loaded as `relprop explain`
    loads them (named weights bring their preprocessing and class names)."""
    from ..dataset.images import image_files
    from .explain_cli import class_name, preprocessing_for
    from .loading import load

    start = time.perf_counter()
    if not args.model:
        raise RelpropError("evaluate IMAGES needs --model (and usually --weights)")
    if not args.images:
        raise RelpropError(f"--model {args.model}: give the images to evaluate on")
    files = image_files(args.images)[:args.n]
    loaded = load(args.model, args.weights)
    prep = preprocessing_for(loaded, args)
    pixels = [prep.read(f) for f in files]
    if len({p.shape for p in pixels}) > 1:
        raise RelpropError("the images differ in size: give --size (or named weights) so "
                           "that they are resized to one")
    x, low, high = prep.batch(pixels)
    model = loaded.model
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + args.batch_size])
                            for i in range(0, len(x), args.batch_size)])
    if logits.dim() != 2:
        raise RelpropError(f"the model's output has shape {tuple(logits.shape)}; expected "
                           "(batch, classes)")
    target = logits.argmax(1)
    side = min(x.shape[-2:])
    patch = args.patch or max(1, -(-side // 7))
    shown = [(np.clip(p[..., 0] if p.shape[-1] == 1 else p, 0, 1) * 255).astype("uint8")
             for p in pixels[:6]]
    titles = [f"{f.name}: {int(t)} {class_name(loaded.categories, int(t))}".strip()
              for f, t in zip(files, target, strict=False)]
    intro = (f"<p>Model {args.model}" + (f" with weights {args.weights}" if args.weights
                                          else "") + f"; {len(files)} images, preprocessed by "
             f"{prep.source}; regions of {patch}x{patch} pixels replaced by uniform noise; "
             "the explained output is the predicted class's logit.</p>")
    return _evaluate(model, x, target, low, high, patch, seed, args.batch_size, args.out,
                     "relprop: faithfulness on your images", intro, shown, titles, start)


def _evaluate(model: nn.Module, x: torch.Tensor, target: torch.Tensor, low, high,
              patch_size: int, seed: int, batch_size: int, out: Path, title: str, intro: str,
              pictures: Sequence[np.ndarray], titles: Sequence[str], start: float) -> dict:
    """Every method's MoRF/LeRF curves, AOPC and ABPC, printed and written as report.html."""
    n = len(x)
    maps: dict[str, torch.Tensor] = {}
    for name in COMPOSITES:
        maps[name] = Explainer(model, composite=name, low=low, high=high)(
            x, target=target, batch_size=batch_size).relevance
    base = baselines(model, x, target, seed=seed)
    for name in BASELINES:
        maps[name] = base[name]
    height, width = x.shape[-2:]
    steps = -(-height // patch_size) * -(-width // patch_size)
    results, curves = {}, {}
    for name, rel in maps.items():
        morf = region_perturbation(model, x, rel, target, patch_size=patch_size, steps=steps,
                                   order="morf", seed=seed, batch_size=max(n * 8, 64))
        lerf = region_perturbation(model, x, rel, target, patch_size=patch_size, steps=steps,
                                   order="lerf", seed=seed, batch_size=max(n * 8, 64))
        curves[name] = (morf.mean(0), lerf.mean(0))
        results[name] = {"aopc_morf": aopc(morf).mean().item(),
                         "aopc_lerf": aopc(lerf).mean().item(),
                         "abpc": (lerf - morf).mean().item()}
        print(f"{name:>22}: AOPC(MoRF) {results[name]['aopc_morf']:.3f}  "
              f"AOPC(LeRF) {results[name]['aopc_lerf']:.3f}  ABPC {results[name]['abpc']:.3f}")
    grid = [[pictures[i]] + [heatmap(maps[m][i], cmap="bwr") for m in maps]
            for i in range(len(pictures))]
    report = write_report(Path(out) / "report.html", title, [
        ("Setup", intro),
        ("AOPC / ABPC", _table(results)),
        ("Perturbation curves", _curves(curves, patch_size)),
        ("Heatmaps", image_grid_html(grid, ["input", *maps], titles))])
    print(f"wrote {report.resolve()} in {time.perf_counter() - start:.1f} s")
    return results


def _table(results: dict[str, dict[str, float]]) -> str:
    rows = [[name, r["aopc_morf"], r["aopc_lerf"], r["abpc"]] for name, r in
            sorted(results.items(), key=lambda kv: -kv[1]["aopc_morf"])]
    return table_html(["method", "AOPC MoRF (higher better)", "AOPC LeRF (lower better)",
                       "ABPC (higher better)"], rows)


def _curves(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], patch_size: int) -> str:
    fig = new_figure(10, 3.6)
    axes = fig.subplots(1, 2)
    for name, (morf, lerf) in curves.items():
        axes[0].plot(morf.numpy(), label=name)
        axes[1].plot(lerf.numpy(), label=name)
    for ax, heading in zip(axes, ("MoRF: most relevant regions first", "LeRF: least "
                                  "relevant first"), strict=True):
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel(f"regions of {patch_size}x{patch_size} replaced")
        ax.set_ylabel("explained logit (mean)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return f'<img src="{figure_data_uri(fig)}" alt="perturbation curves">'
