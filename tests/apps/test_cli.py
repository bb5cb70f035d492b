"""The command line: explain images with any model, evaluate faithfulness, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from checks import images_decoded
from PIL import Image

from relprop.apps.cli import main
from relprop.apps.datasets import load_mnist


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_explain_writes_heatmaps_and_scores(images, weights, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["explain", str(images), "--model", "resnet18", "--weights", str(weights),
                 "--size", "64", "--target", "top2", "--out", str(out), "--batch-size", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "3/3" in captured.err  # progress over the images
    rows = json.loads((out / "scores.json").read_text())
    assert len(rows) == 6 and {r["rank"] for r in rows} == {1, 2}
    assert (out / "scores.csv").read_text().count("\n") == 7
    for r in rows:
        stem = f"{r['image'].rsplit('/', 1)[-1][:-4]}_class{r['target']}"
        for kind in ("heatmap", "overlay"):
            img = np.asarray(Image.open(out / f"{stem}_{kind}.png"))
            assert img.shape == (64, 64, 3)
        assert np.isfinite(r["relevance_sum"])


def test_explain_with_a_model_from_module_callable(tmp_path) -> None:
    digit = (np.random.default_rng(1).random((28, 28)) * 255).astype(np.uint8)
    Image.fromarray(digit).convert("RGB").save(tmp_path / "d.png")

    out = tmp_path / "o"
    code = main(["explain", str(tmp_path / "d.png"), "--model", "cli_models:rgb_mnist",
                 "--size", "28", "--no-normalize", "--target", "3", "--out", str(out),
                 "--composite", "epsilon_plus"])
    assert code == 0
    rows = json.loads((out / "scores.json").read_text())
    assert rows[0]["target"] == 3


@pytest.mark.parametrize(("args", "message"), [
    (["explain", "nope/missing.png", "--model", "resnet18"], "no such file or folder"),
    (["explain", "IMAGES", "--model", "resnet9000"], "unknown architecture 'resnet9000'"),
    (["explain", "IMAGES", "--model", "resnet34", "--weights", "WEIGHTS"], "do not fit"),
    (["explain", "IMAGES", "--model", "resnet18", "--target", "best"], "--target 'best'"),
    (["explain", "IMAGES", "--model", "resnet18", "--size", "64", "--target", "5000"],
     "out of range"),
])
def test_explain_errors_are_clear(images, weights, args, message, capsys) -> None:
    args = [str(images) if a == "IMAGES" else str(weights) if a == "WEIGHTS" else a
            for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_unreadable_image_is_named(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["explain", str(bad), "--model", "resnet18", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "bad.png" in err


def test_evaluate_on_your_model_and_images(tmp_path, capsys) -> None:
    """The faithfulness report for a model given by name, on image files: real digits
    through `module:callable`, loaded as `relprop explain` loads them."""
    x, _ = load_mnist("test")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(24):
        Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8)).save(
            folder / f"d{i:02d}.png")
    out = tmp_path / "out"
    assert main(["evaluate", str(folder), "--model", "cli_models:rgb_mnist", "--size", "28",
                 "--no-normalize", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    aopc = {line.split(":")[0].strip(): float(line.split("AOPC(MoRF)")[1].split()[0])
            for line in printed.splitlines() if "AOPC(MoRF)" in line}
    assert set(aopc) == {"epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1",
                         "gradient", "gradient_x_input", "random"}
    assert aopc["random"] < min(aopc[m] for m in ("epsilon_plus", "epsilon_gamma_box"))
    text = (out / "report.html").read_text()
    assert "cli_models:rgb_mnist" in text and "24 images" in text and "4x4" in text
    assert text.count("<img") == 1 + 6 * 7  # curves, then 6 rows of input + 6 methods


@pytest.mark.parametrize(("args", "message"), [
    (["evaluate", "IMAGES"], "needs --model"),
    (["evaluate", "--model", "resnet18"], "give the images"),
])
def test_evaluate_arguments_are_checked(images, args, message, capsys) -> None:
    args = [str(images) if a == "IMAGES" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_every_command_has_help(capsys) -> None:
    for cmd in ([], ["demo"], ["explain"], ["evaluate"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_evaluate_writes_a_report_that_a_browser_shows(tmp_path, capsys) -> None:
    assert main(["evaluate", "--n", "60", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    aopc = {line.split(":")[0].strip(): float(line.split("AOPC(MoRF)")[1].split()[0])
            for line in out.splitlines() if "AOPC(MoRF)" in line}
    assert aopc["random"] < min(aopc[m] for m in ("epsilon_plus", "epsilon_gamma_box"))
    report = tmp_path / "report.html"
    text = report.read_text()
    assert "AOPC" in text and text.count("<img") >= 2
    total, ok = images_decoded(report, tmp_path / 'profile')
    assert total >= 2 and ok == total  # every embedded picture decoded in a real browser
