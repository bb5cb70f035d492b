"""The README's picture of an explained generation, on a model trained here on real text.

A tiny GPT-2 (word-level, 2 layers) learns the Zen of Python (the text of the standard
library's `this` module) by heart; then `relprop.explain_generation` explains what it
writes after "Beautiful is better than ugly. Explicit is better than". Each line of the
Zen is "X is better than Y.", so a faithful explanation puts the relevance for Y on X.

    python scripts/generation_picture.py      # writes docs/generation_matrix.png, ..._row.png

Runs offline in about a minute on two CPU cores; nothing is downloaded or saved but the
pictures.
"""

from __future__ import annotations

import codecs
import contextlib
import io
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import relprop
from relprop.visualize import token_png

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROMPT = "Beautiful is better than ugly. Explicit is better than"


def zen_words() -> list[str]:
    """The Zen of Python, split at white space (punctuation stays on its word)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
        import this
    return codecs.decode(this.s, "rot13").split()


def train(words: list[str], vocab: list[str], steps: int = 600, window: int = 24,
          batch: int = 32) -> GPT2LMHeadModel:
    """Next-word prediction on windows that start anywhere in the text, so the model reads
    the words, not their positions, until it knows the text by heart."""
    torch.manual_seed(0)
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([index[w] for w in words])
    config = GPT2Config(vocab_size=len(vocab), n_positions=window, n_embd=64, n_layer=2,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, loss_type="ForCausalLM")
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        starts = torch.randint(0, len(ids) - window + 1, (batch,))
        chunk = torch.stack([ids[s:s + window] for s in starts.tolist()])
        loss = model(chunk, labels=chunk).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return model.eval()


def main() -> None:
    words = zen_words()
    vocab = sorted(set(words))
    model = train(words, vocab)
    index = {w: i for i, w in enumerate(vocab)}
    prompt = torch.tensor([[index[w] for w in PROMPT.split()]])
    gen = relprop.explain_generation(model, prompt, max_new_tokens=9)
    strings = [vocab[i] for i in gen.ids[0].tolist()]
    print("generated:", " ".join(strings[prompt.shape[1]:]))
    print("matrix:", gen.to_png(DOCS / "generation_matrix.png", strings))
    P = gen.prompt_length  # the first generated word, explained over the prompt
    token_png(strings[:P], gen.relevance[0, 0, :P], DOCS / "generation_row.png",
              title=f"why the model wrote {strings[P]!r} next")
    print("row:", DOCS / "generation_row.png", "for", repr(strings[P]))
    # most of a logit comes from the word just read; a contrast cancels what two answers
    # share and leaves what tells them apart
    why = gen.contrast(0, index["complex."])
    token_png(strings[:P], why.relevance[0, :P], DOCS / "generation_contrast.png",
              title=f"why {strings[P]!r} and not 'complex.'")
    print("contrast:", DOCS / "generation_contrast.png")


if __name__ == "__main__":
    main()
