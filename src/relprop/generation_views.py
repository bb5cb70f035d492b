"""Views of a relprop.generation.Generation: HTML to hover, a PNG matrix, LaTeX boxes.

Colours are bwr (red positive, white zero, blue negative), each generated token's row
scaled by its own largest |relevance|, computed here in plain Python (the HTML and
LaTeX need no matplotlib; the PNG imports it when drawn, as relprop.visualize does).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError
from .visualize import _save_figure, colormap, new_figure, token_words

if TYPE_CHECKING:
    from .generation import Generation


def token_strings(gen: Generation, tokens: Any, sample: int) -> list[str]:
    """The T token strings of one sample from a tokenizer, one list per sample, one
    sample's list, or None (the ids as numbers)."""
    ids = gen.ids[sample].tolist()
    if tokens is None:
        out = [str(i) for i in ids]
    elif hasattr(tokens, "convert_ids_to_tokens"):
        out = [str(t) for t in tokens.convert_ids_to_tokens(ids)]
    elif tokens and not isinstance(tokens[0], str):
        out = [str(t) for t in tokens[sample]]
    else:
        out = [str(t) for t in tokens]
    if len(out) != len(ids):
        raise InputError(f"{len(out)} token strings for a sequence of {len(ids)}")
    return out


def scaled(gen: Generation, sample: int) -> torch.Tensor:
    """(N, T) relevance of one sample, each row divided by its largest |value| (0 rows
    stay 0)."""
    r = gen.relevance[sample].detach().double().cpu()
    top = r.abs().amax(-1, keepdim=True)
    return r / torch.where(top > 0, top, torch.ones_like(top))


def rgb(v: float) -> tuple[int, int, int]:
    """bwr at v in [-1, 1] (matplotlib's bwr is these two linear ramps)."""
    v = max(-1.0, min(1.0, v))
    if v >= 0:
        return 255, round(255 * (1 - v)), round(255 * (1 - v))
    return round(255 * (1 + v)), round(255 * (1 + v)), 255


def _shown(gen: Generation, sample: int) -> list[int]:
    """The positions to show: all but left padding."""
    T = gen.ids.shape[1]
    if gen.attention_mask is None:
        return list(range(T))
    return [t for t in range(T) if bool(gen.attention_mask[sample, t])]


_CSS = """
.relprop-generation { font-family: monospace; line-height: 2.0; margin: 1em 0; }
.relprop-generation .tok { padding: 1px 1px; border-radius: 2px; }
.relprop-generation .gen { text-decoration: underline; cursor: pointer; }
.relprop-generation .gen.on { outline: 2px solid #222; }
"""

_JS = """
(function () {
  function colour(v) {
    v = Math.max(-1, Math.min(1, v));
    var a = Math.round(255 * (1 - Math.abs(v)));
    return v >= 0 ? [255, a, a] : [a, a, 255];
  }
  document.querySelectorAll('.relprop-generation').forEach(function (box) {
    var rel = JSON.parse(box.getAttribute('data-relevance'));
    var raw = JSON.parse(box.getAttribute('data-raw'));
    var toks = box.querySelectorAll('.tok');
    function paint(n) {
      toks.forEach(function (s) {
        var t = +s.getAttribute('data-t');
        var v = n === null ? 0 : rel[n][t];
        var c = colour(v);
        s.style.background = n === null ? '' : 'rgb(' + c.join(',') + ')';
        s.style.color = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) > 127 ? '#000' : '#fff';
        s.title = n === null ? '' : s.textContent + ': ' + raw[n][t].toPrecision(4);
      });
    }
    box.querySelectorAll('.gen').forEach(function (g) {
      var n = +g.getAttribute('data-n');
      g.addEventListener('mouseenter', function () { g.classList.add('on'); paint(n); });
      g.addEventListener('mouseleave', function () { g.classList.remove('on'); paint(null); });
    });
  });
})();
"""


def html_page(gen: Generation, tokens: Any = None, path: str | Path | None = None) -> str:
    """One block per sample: the prompt and the generated tokens (underlined); hovering
    the n-th generated token colours the tokens before it by row n of the relevance."""
    P = gen.prompt_length
    blocks = []
    for b in range(gen.ids.shape[0]):
        strings = token_strings(gen, tokens, b)
        words = token_words(strings)
        rows = scaled(gen, b)
        parts = []
        for i, t in enumerate(_shown(gen, b)):
            text, new_word = words[t]
            if new_word and i > 0:
                parts.append(" ")
            gen_attr = f' class="tok gen" data-n="{t - P}"' if t >= P else ' class="tok"'
            parts.append(f'<span{gen_attr} data-t="{t}">{html.escape(text)}</span>')
        rel = json.dumps([[round(float(v), 4) for v in row] for row in rows])
        raw = json.dumps([[float(v) for v in row] for row in gen.relevance[b].double().cpu()])
        blocks.append(f'<div class="relprop-generation" data-relevance="{html.escape(rel)}" '
                      f'data-raw="{html.escape(raw)}">{"".join(parts)}</div>')
    page = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>relprop: explained '
            f'generation</title><style>{_CSS}</style></head><body>\n'
            '<p>Hover a generated (underlined) token: its context is coloured by relevance '
            '(red for, blue against).</p>\n' + "\n".join(blocks)
            + f"\n<script>{_JS}</script></body></html>\n")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    return page


def matrix_png(gen: Generation, path: str | Path, tokens: Any = None, sample: int = 0) -> Path:
    """The (N, T) relevance of one sample, rows scaled as in the HTML, as a PNG: generated
    tokens down, the sequence across."""
    strings = [w for w, _ in token_words(token_strings(gen, tokens, sample))]
    rows = scaled(gen, sample).numpy()
    N, T = rows.shape
    fig = new_figure(max(4.0, 0.3 * T + 1.5), max(2.0, 0.3 * N + 1.2))
    ax = fig.subplots()
    ax.imshow(rows, cmap=colormap("bwr"), vmin=-1, vmax=1, aspect="auto",
              interpolation="nearest")
    ax.set_xticks(range(T), strings, rotation=90, fontsize=7)
    ax.set_yticks(range(N), strings[gen.prompt_length:], fontsize=7)
    ax.set_xlabel("context")
    ax.set_ylabel("generated")
    return _save_figure(fig, path)


_LATEX = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&",
          "#": r"\#", "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%",
          "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX.get(c, c) for c in text)


def latex(gen: Generation, tokens: Any = None, sample: int = 0) -> str:
    """One paragraph per generated token: the tokens before it in \\colorbox[RGB] (its
    row of relevance), then the token \\fbox ed. Needs \\usepackage{xcolor}."""
    words = token_words(token_strings(gen, tokens, sample))
    rows = scaled(gen, sample)
    shown = _shown(gen, sample)
    P = gen.prompt_length
    paragraphs = []
    for n in range(rows.shape[0]):
        parts = []
        for i, t in enumerate(p for p in shown if p < P + n):
            text, new_word = words[t]
            r, g, b = rgb(float(rows[n, t]))
            space = " " if new_word and i > 0 else ""
            parts.append(f"{space}\\colorbox[RGB]{{{r},{g},{b}}}{{\\strut {_tex(text)}}}")
        text, new_word = words[P + n]
        parts.append(f"{' ' if new_word else ''}\\fbox{{\\strut {_tex(text)}}}")
        paragraphs.append("\\noindent" + "\\allowbreak".join(parts) + "\\par")
    return ("% relprop: explained generation (\\usepackage{xcolor}); red for, blue against\n"
            "\\begingroup\\setlength{\\fboxsep}{1pt}\n" + "\n\n".join(paragraphs)
            + "\n\\endgroup\n")
