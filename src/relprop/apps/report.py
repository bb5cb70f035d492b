"""A self-contained HTML report: images embedded as data URIs, tables, curves.

One file that opens anywhere (no server, no network). A small script marks
<body data-images-ok="N"> once all N images have decoded, so a headless
browser test can check that the page really shows its pictures.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesTotal = String(imgs.length);
});
</script>
"""

_STYLE = """
<style>
body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; }
img { image-rendering: pixelated; }
.grid img { width: 84px; height: 84px; margin: 1px; }
</style>
"""


def png_data_uri(image: np.ndarray) -> str:
    """An (H, W[, 3]) uint8 array as a data: URI."""
    from ..visualize import optional

    buf = io.BytesIO()
    optional("PIL.Image").fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image_grid_html(rows: Sequence[Sequence[np.ndarray]], col_titles: Sequence[str],
                    row_titles: Sequence[str] = ()) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(t)}</th>" for t in col_titles) + \
        "</tr>"
    body = ""
    for i, row in enumerate(rows):
        title = html.escape(row_titles[i]) if i < len(row_titles) else ""
        cells = "".join(f'<td><img src="{png_data_uri(img)}" alt="{html.escape(col_titles[j])}">'
                        f"</td>" for j, img in enumerate(row))
        body += f"<tr><th>{title}</th>{cells}</tr>"
    return f'<table class="grid">{head}{body}</table>'


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """sections: (heading, html body) pairs."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title>{_STYLE}</head><body><h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append(_SCRIPT + "</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    return path
