"""The demo's step "a model that cheats, found and fixed", from the data alone.

1. The planted Clever Hans: the small CNN trained on digits where 80% of the 8s carry a
   small white stamp in the top-left corner (shipped weights; --retrain trains them, ~10 s).
2. Found: every 8 of the training digits explained (explain_dataset), SpRAy on them. The
   spectrum has a gap after k=2, and one cluster's mean heatmap lights the corner.
3. Fixed: the cell of the 7x7 grid where the two clusters' pooled maps differ most locates
   the artifact. It is copied from the cheat cluster's images onto the clean cluster's, so
   ClArC gets pairs that differ only by the artifact, and projects that direction out.
Nothing here uses what the planting code knows about the stamp; the demo only checks against
it at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .planted import PlantedDigits, planted_mnist, shortcut_report, train_planted_cnn

WEIGHTS = Path(__file__).parent / "data" / "planted_cnn.pt"
LAYER = "features"


def planted_cnn() -> torch.nn.Module:
    """The small CNN trained on the planted digits (train_planted_cnn(), shipped)."""
    from ..zoo import MnistCNN

    model = MnistCNN()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def paste(x: Tensor, source: Tensor, cell: tuple[int, int], size: int) -> Tensor:
    """Copies of x with the (size x size) block at grid cell `cell` taken from `source`'s
    images in turn."""
    r, c = cell[0] * size, cell[1] * size
    out = x.clone()
    src = source[torch.arange(len(x)) % len(source)]
    out[:, :, r:r + size, c:c + size] = src[:, :, r:r + size, c:c + size]
    return out


def cheat_section(out: Path, retrain: bool = False) -> str | None:
    """Runs the step, writes its pictures under out/cheat, returns the report's HTML body
    (None, with a line saying why, when the analysis extra is missing)."""
    try:
        import corelay  # noqa: F401
        import h5py  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        print("5. a model that cheats: skipped (pip install 'relprop[analysis]')")
        return None
    from sklearn.metrics import adjusted_rand_score

    from ...analysis.clarc import clarc, region_share
    from ...analysis.spray import SpraySettings, analyse_class, eigenvalue_plot, pool_maps, spray
    from ...dataset import explain_dataset, load_explanations
    from ...evaluate import baselines
    from ...explain import Explainer
    from ...visualize import heatmap, save_grid
    from ..report import image_grid_html, table_html

    start = time.perf_counter()
    folder = Path(out) / "cheat"
    train, test = planted_mnist("train"), planted_mnist("test")
    model = train_planted_cnn(train) if retrain else planted_cnn()
    before = shortcut_report(model, test)

    eights = train.y == 8
    data = PlantedDigits(train.x[eights], train.y[eights], train.marked[eights])
    expl_dir = folder / "explanations"
    explain_dataset(model, data, expl_dir, "epsilon_gamma_box", target="label",
                    batch_size=128, shard_size=512, progress=False, low=0.0, high=1.0)
    result = spray(expl_dir, classes=[8], tsne=False)
    a = result[8]
    members = a.members(2)
    grid = result.settings.grid
    # each cluster's mean pooled map, as shares of its |relevance|; where they differ most
    means = {}
    for k, idx in members.items():
        m = a.features[np.isin(a.indices, idx)].mean(0).reshape(grid, grid)
        means[k] = m / np.abs(m).sum()
    diff = means[0] - means[1]
    cell_flat = int(np.argmax(np.abs(diff)))
    cell = divmod(cell_flat, grid)
    cheat = 0 if diff.flat[cell_flat] > 0 else 1
    size = 28 // grid
    cheat_x, clean_x = data.x[members[cheat]], data.x[members[1 - cheat]]
    stamped = data.marked[members[cheat]].float().mean().item()
    ari = adjusted_rand_score(data.marked[a.indices].numpy(), a.clusterings["kmeans-2"])
    gxi = baselines(model, data.x[a.indices], 8)["gradient_x_input"]
    fine = analyse_class(8, a.indices, pool_maps(gxi, 28).double().numpy(),
                         SpraySettings(grid=28, tsne=False, agglomerative=False))
    ari_fine = adjusted_rand_score(data.marked[a.indices].numpy(), fine.clusterings["kmeans-2"])

    spectrum = eigenvalue_plot(result, folder / "spray_eigenvalues.png")
    expl = load_explanations(expl_dir)
    rows = []
    for k in (cheat, 1 - cheat):
        idx = members[k][:3]
        mean = torch.stack([expl[int(i)]["relevance"].float() for i in members[k]]).mean(0)
        rows.append([heatmap(mean, cmap="bwr")] +
                    [(data.x[int(i), 0].numpy() * 255).astype("uint8") for i in idx] +
                    [heatmap(expl[int(i)]["relevance"], cmap="bwr") for i in idx])
    titles = ["mean heatmap", "input", "input", "input", "heatmap", "heatmap", "heatmap"]
    save_grid(rows, folder / "clusters.png", col_titles=titles,
              row_titles=[f"cheat ({len(members[cheat])})", f"clean ({len(members[1 - cheat])})"])

    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[cell[0] * size:(cell[0] + 1) * size, cell[1] * size:(cell[1] + 1) * size] = True
    artifact = paste(clean_x, cheat_x, cell, size)
    fixed = clarc(model, LAYER, artifact, clean_x)
    after = shortcut_report(fixed.model, test)
    test8 = test.x[(test.y == 8) & test.marked]
    r0, r1 = (Explainer(m, "epsilon_gamma_box", low=0.0, high=1.0)(test8, target=8).relevance
              for m in (model, fixed.model))
    share_before, share_after = region_share(r0, mask), region_share(r1, mask)
    show = test8[:5]
    fix_rows = [[(x[0].numpy() * 255).astype("uint8"), heatmap(b, cmap="bwr"),
                 heatmap(c, cmap="bwr")] for x, b, c in zip(show, r0, r1, strict=False)]
    save_grid(fix_rows, folder / "clarc.png", col_titles=["stamped 8", "before", "after ClArC"])

    table = [
        ["8s with the stamp, called 8", before["class_marked"], after["class_marked"]],
        ["8s without the stamp, called 8", before["class_unmarked"], after["class_unmarked"]],
        ["other digits (no stamp), accuracy", before["others_clean"], after["others_clean"]],
        ["other digits with the stamp, called 8", before["others_marked_called_class"],
         after["others_marked_called_class"]],
        ["stamped 8s: share of positive relevance in the found cell", share_before,
         share_after],
    ]
    seconds = time.perf_counter() - start
    print(f"5. a model that cheats, found and fixed: stamped 8s called 8 "
          f"{before['class_marked']:.3f}, unstamped {before['class_unmarked']:.3f}; SpRAy on "
          f"{len(a.indices)} training 8s: eigenvalues {a.eigenvalues[1]:.3f} / "
          f"{a.eigenvalues[2]:.3f}, a cluster of {len(members[cheat])} ({stamped:.0%} stamped,"
          f" ARI {ari:.2f}; gradient x input at 28x28: ARI {ari_fine:.2f}) looks at cell "
          f"{cell}; ClArC: relevance there {share_before:.2f} -> {share_after:.2f}, stamped "
          f"other digits called 8 {before['others_marked_called_class']:.3f} -> "
          f"{after['others_marked_called_class']:.3f} ({seconds:.1f} s)")
    body = (
        "<p>The small CNN trained on real digits where 80% of the 8s (and 3% of the others) "
        "carry a 2x2 white stamp somewhere in the top-left 4x4 pixels. It reads digits, and "
        "it also learned that the stamp means 8.</p>"
        "<h3>Found: SpRAy over every training 8</h3>"
        f"<p>{len(a.indices)} heatmaps (explain_dataset, epsilon_gamma_box) sum-pooled to "
        f"{grid}x{grid}; eigenvalues of the kNN graph's normalised Laplacian: "
        f"{', '.join(f'{v:.3f}' for v in a.eigenvalues[:5])}. The second is 0 and the third "
        f"is not: two strategies. One cluster ({len(members[cheat])} images, {stamped:.0%} "
        f"of them stamped; adjusted Rand index {ari:.2f} against the stamp) looks at grid cell "
        f"{cell}, the top-left corner. Gradient x input at full resolution finds nothing "
        f"(ARI {ari_fine:.2f}).</p>"
        f'<img class="plot" src="{_png_uri(spectrum)}" alt="spectrum">'
        + image_grid_html(rows, titles, [f"cheat cluster ({len(members[cheat])})",
                                         f"clean cluster ({len(members[1 - cheat])})"])
        + "<h3>Fixed: projective ClArC</h3>"
        "<p>The found cell copied from the cheat cluster's images onto the clean cluster's "
        f"gives pairs that differ only there; their difference at layer '{LAYER}' is the "
        "artifact's direction, projected out towards the clean mean in a corrected copy of "
        "the model (the original is untouched).</p>"
        + table_html(["test digits", "before", "after"], table)
        + image_grid_html(fix_rows, ["stamped 8", "before", "after ClArC"]))
    return body


def _png_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
