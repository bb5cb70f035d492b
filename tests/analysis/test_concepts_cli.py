"""`relprop collect-concepts` and `relprop concepts` on real MNIST digits with the shipped
CNN: references collected from a folder of digit images, then the atlas page of one digit,
which headless Chromium shows with every picture decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from checks import images_decoded
from PIL import Image

import relprop.concepts as rc
from relprop.apps.cli import main
from relprop.apps.datasets import load_mnist


def digit_folder(root: Path, n: int = 24) -> Path:
    x, y = load_mnist("test")
    for i in range(n):
        folder = root / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8)).convert("RGB").save(
            folder / f"{i:03d}.png")
    return root


def test_collect_then_atlas_in_a_browser(tmp_path: Path, capsys) -> None:
    folder = digit_folder(tmp_path / "digits")
    model = ["--model", "cli_models:rgb_mnist", "--size", "28", "--no-normalize"]
    refs = tmp_path / "refs"
    assert main(["collect-concepts", str(folder), *model, "--layers", "1.features.3",
                 "1.classifier.1", "--out", str(refs), "--n", "4", "--workers", "0",
                 "--batch-size", "8", "--shard-size", "16", "--quiet"]) == 0
    collected = rc.load(refs)
    assert collected.channels("1.features.3") == 32 and collected.channels("1.classifier.1") == 64
    top = collected.top("1.features.3", 5)
    assert len(top) == 4 and (top.scores[:-1] >= top.scores[1:]).all()
    assert Path(collected.path(int(top.indices[0]))).is_file()
    image = next(folder.glob("7/*.png"))
    out = tmp_path / "atlas"
    assert main(["concepts", str(image), *model, "--layer", "1.features.3", "--references",
                 str(refs), "--lower", "1.features.0", "--top", "3", "--n-refs", "2",
                 "--out", str(out)]) == 0
    page = out / f"{image.stem}_concepts.html"
    text = page.read_text()
    assert text.count("<h2>Concept ") == 3 and "Reference samples" in text and "<svg" in text
    # input + relevance, and per concept: input + heatmap + 2 references x (crop + heatmap)
    assert text.count("<img") == 2 + 3 * (2 + 2 * 2)
    total, ok = images_decoded(page, tmp_path / 'profile')
    assert total == 20 and ok == total
    assert main(["concepts", str(image), *model, "--layer", "1.nope", "--out", str(out)]) == 2
    assert "no layer '1.nope'" in capsys.readouterr().err


def test_demo_concepts_step(tmp_path: Path, capsys) -> None:
    """The demo's step on the shipped CNN and real digits: the channels that carry the
    prediction (positive shares, largest first) with the labels of their reference digits,
    and the atlas page beside the report."""
    from relprop.apps.concepts.demo import concepts_section

    body = concepts_section(tmp_path, n=200, top=3)
    line = capsys.readouterr().out
    assert line.startswith("6. concepts: the ") and line.count("channel ") == 3
    shares = [float(s.split("%")[0]) for s in line.split("(")[1:4]]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0
    assert body.count("<tr>") == 1 + 3 and "concepts.html" in body
    page = (tmp_path / "concepts.html").read_text()
    assert page.count("<h2>Concept ") == 3 and page.count("<svg") == 3
