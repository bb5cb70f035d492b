"""The demo's concepts step on the real MNIST CNN: which channels of its second
convolution decide a digit, where each looks, and the test digits where each matters
most (reference samples collected over 1,000 real test digits)."""

from __future__ import annotations

import html
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ...concepts.collect import collect
from ...concepts.references import load
from ...concepts.relevance import relevance
from ...explain import Explainer
from ..report import table_html
from .atlas import atlas, dataset_reader

LAYER = "features.3"  # the second convolution: 32 channels


def concepts_section(out: Path, model: nn.Module | None = None, n: int = 1000,
                     index: int = 0, top: int = 4) -> str:
    """Writes out/concepts.html (the atlas of test digit `index`) and out/concepts-refs
    (the references); returns the report section's body and prints one line."""
    from ..datasets import load_mnist
    from ..zoo import mnist_cnn

    out = Path(out)
    model = mnist_cnn() if model is None else model
    x, y = load_mnist("test")
    digits = TensorDataset(x[:n], y[:n])
    collect(model, digits, [LAYER], out / "concepts-refs", "epsilon_plus", n=6,
            batch_size=200, shard_size=500, progress=False)
    refs = load(out / "concepts-refs")
    explainer = Explainer(model, "epsilon_plus")
    sample = x[index:index + 1]
    with torch.no_grad():
        pred = int(model(sample).argmax())
    per = relevance(explainer, sample, pred, LAYER)
    page = atlas(explainer, sample, out / "concepts.html", layer=LAYER, top=top,
                 references=refs, reader=dataset_reader(digits), n_refs=6,
                 lower=["features.0"], width=3, class_names=[str(d) for d in range(10)],
                 title=f"Concepts of the MNIST CNN ({LAYER}) for a {pred}")
    rows, words = [], []
    for c, r, share in per.top(top):
        labels = [refs.label(i) for i in refs.top(LAYER, c).indices.tolist()]
        rows.append((c, r, f"{100 * share:.1f}%", " ".join(map(str, labels))))
        words.append(f"channel {c} ({100 * share:.0f}%: {' '.join(map(str, labels[:4]))})")
    print(f"6. concepts: the {pred} is carried by " + "; ".join(words) +
          f"; wrote {page.resolve()}")
    return (f"<p>Test digit {index}, predicted {pred}: the channels of {LAYER} that carry "
            f"the prediction and the labels of the {n} test digits where each matters most "
            f"(<a href='{html.escape(page.name)}'>concept atlas</a>).</p>" +
            table_html(["channel", "relevance", "share", "reference digits (labels)"], rows))
