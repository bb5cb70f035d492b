"""`relprop evaluate`: how faithful are the explanations of the shipped MNIST CNN?

Region perturbation (Samek et al. 2017) on real test digits: regions are
removed most relevant first (MoRF) and least relevant first (LeRF), replaced by
uniform noise; AOPC = mean drop of the explained logit along MoRF (higher =
the explanation found what the model uses), ABPC = LeRF area minus MoRF area.
LRP composites against the plain gradient, gradient x input and random maps.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .datasets import load_mnist
from .evaluate import aopc, baselines, region_perturbation
from .explain import Explainer
from .report import figure_data_uri, image_grid_html, table_html, write_report
from .visualize import heatmap
from .zoo import accuracy, mnist_cnn

COMPOSITES = ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]
BASELINES = ["gradient", "gradient_x_input", "random"]


def run_evaluate(out: Path, n: int = 500, patch_size: int = 4, seed: int = 0) -> dict:
    start = time.perf_counter()
    x, y = load_mnist("test")
    x, y = x[:n], y[:n]
    model = mnist_cnn()
    acc = accuracy(model, x, y)
    with torch.no_grad():
        target = model(x).argmax(1)
    maps: dict[str, torch.Tensor] = {}
    for name in COMPOSITES:
        maps[name] = Explainer(model, composite=name, low=0.0, high=1.0)(
            x, target=target, batch_size=250).relevance
    base = baselines(model, x, target, seed=seed)
    for name in BASELINES:
        maps[name] = base[name]
    steps = ((28 + patch_size - 1) // patch_size) ** 2
    results, curves = {}, {}
    for name, rel in maps.items():
        morf = region_perturbation(model, x, rel, target, patch_size=patch_size, steps=steps,
                                   order="morf", seed=seed, batch_size=n * 8)
        lerf = region_perturbation(model, x, rel, target, patch_size=patch_size, steps=steps,
                                   order="lerf", seed=seed, batch_size=n * 8)
        curves[name] = (morf.mean(0), lerf.mean(0))
        results[name] = {"aopc_morf": aopc(morf).mean().item(),
                         "aopc_lerf": aopc(lerf).mean().item(),
                         "abpc": (lerf - morf).mean().item()}
        print(f"{name:>22}: AOPC(MoRF) {results[name]['aopc_morf']:.3f}  "
              f"AOPC(LeRF) {results[name]['aopc_lerf']:.3f}  ABPC {results[name]['abpc']:.3f}")
    report = _report(out, x, y, target, maps, results, curves, acc, n, patch_size)
    print(f"wrote {report.resolve()} in {time.perf_counter() - start:.1f} s")
    return results


def _report(out, x, y, target, maps, results, curves, acc, n, patch_size) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (morf, lerf) in curves.items():
        axes[0].plot(morf.numpy(), label=name)
        axes[1].plot(lerf.numpy(), label=name)
    for ax, title in zip(axes, ("MoRF: most relevant regions first", "LeRF: least relevant "
                                "first"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"regions of {patch_size}x{patch_size} replaced")
        ax.set_ylabel("explained logit (mean)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plot = f'<img src="{figure_data_uri(fig)}" alt="perturbation curves">'
    plt.close(fig)
    rows = [[name, r["aopc_morf"], r["aopc_lerf"], r["abpc"]] for name, r in
            sorted(results.items(), key=lambda kv: -kv[1]["aopc_morf"])]
    table = table_html(["method", "AOPC MoRF (higher better)", "AOPC LeRF (lower better)",
                        "ABPC (higher better)"], rows)
    names = list(maps)
    grid = [[(x[i, 0].numpy() * 255).astype("uint8")] +
            [heatmap(maps[m][i], cmap="bwr") for m in names] for i in range(6)]
    titles = [f"label {int(y[i])}, pred {int(target[i])}" for i in range(6)]
    intro = (f"<p>MNIST CNN shipped with relprop, test accuracy {acc:.3f}; {n} real test "
             f"digits; regions of {patch_size}x{patch_size} pixels replaced by uniform noise; "
             "the explained output is the predicted class's logit.</p>")
    return write_report(Path(out) / "report.html", "relprop: faithfulness on MNIST",
                        [("Setup", intro), ("AOPC / ABPC", table), ("Perturbation curves", plot),
                         ("Heatmaps", image_grid_html(grid, ["input", *names], titles))])
