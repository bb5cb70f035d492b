"""Models and weights by name, loaded as people load them, offline: torchvision's weight
enums from torch's cache (with their preprocessing and class names), timm from the local
Hugging Face cache, Hugging Face image classifiers from a saved folder, and files."""

from __future__ import annotations

import csv
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import relprop.apps.explain_cli as explain_cli
from relprop.apps.cli import main
from relprop.apps.loading import Logits, load
from relprop.errors import RelpropError

ARCH = "squeezenet1_1"  # small and quick to explain
WEIGHTS = torchvision.models.get_model_weights(ARCH).DEFAULT
CHECKPOINT = Path(WEIGHTS.url).name


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "pic.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch cache (TORCH_HOME), and no network: a download attempt fails."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network in the test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home


@pytest.fixture
def cached_state(torch_home) -> dict[str, torch.Tensor]:
    """Random weights saved where torch.hub looks for the DEFAULT weights' file."""
    torch.manual_seed(1)
    state = torchvision.models.get_model(ARCH).state_dict()
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, torch_home / "hub" / "checkpoints" / CHECKPOINT)
    return state


def test_weights_by_name_from_torchs_cache_offline(cached_state, picture, tmp_path,
                                                   monkeypatch) -> None:
    titles: list[str] = []  # of the titled picture of each image, as drawn
    monkeypatch.setattr(explain_cli, "relevance_figure", _keep(explain_cli.relevance_figure,
                                                               titles))
    out = tmp_path / "out"
    assert main(["explain", str(picture), "--model", ARCH, "--weights", "DEFAULT",
                 "--target", "top2", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    categories = WEIGHTS.meta["categories"]
    assert [r["class_name"] for r in rows] == [categories[int(r["target"])] for r in rows]
    # the input is what the weights' own transforms make of the picture
    model = torchvision.models.get_model(ARCH)
    model.load_state_dict(cached_state)
    with torch.no_grad():
        expected = model.eval()(WEIGHTS.transforms()(Image.open(picture).convert("RGB"))[None])[0]
    for r in rows:
        assert float(r["logit"]) == pytest.approx(float(expected[int(r["target"])]), abs=1e-4)
    assert any(categories[int(rows[0]["target"])] in t for t in titles)
    assert (out / "pic_explained.png").is_file()


def _keep(draw, titles: list[str]):
    """draw, recording the titles of the figures it returns."""

    def titled(*args, **kwargs):
        fig = draw(*args, **kwargs)
        titles.extend(ax.get_title() for ax in fig.axes)
        return fig
    return titled


def test_enum_spellings_and_unknown_names(cached_state) -> None:
    for name in ("DEFAULT", "IMAGENET1K_V1", "SqueezeNet1_1_Weights.IMAGENET1K_V1"):
        loaded = load(ARCH, name)
        assert torch.equal(loaded.model.state_dict()["features.0.weight"],
                           cached_state["features.0.weight"])
        assert loaded.categories == WEIGHTS.meta["categories"]
    with pytest.raises(RelpropError, match="choose one of IMAGENET1K_V1"):
        load(ARCH, "IMAGENET1K_V9")
    with pytest.raises(RelpropError, match="no weights named 'ResNet50_Weights.IMAGENET1K_V2'"):
        load(ARCH, "ResNet50_Weights.IMAGENET1K_V2")


def test_missing_file_offline_says_where_to_put_it(torch_home, picture, tmp_path,
                                                   capsys) -> None:
    assert main(["explain", str(picture), "--model", ARCH, "--weights", "DEFAULT",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("relprop: error")]
    assert len(line) == 1
    assert str(torch_home / "hub" / "checkpoints" / CHECKPOINT) in line[0]
    assert WEIGHTS.url in line[0]


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_weights_file_state_dict_or_checkpoint(tmp_path, wrap) -> None:
    torch.manual_seed(2)
    state = torchvision.models.get_model(ARCH).state_dict()
    path = tmp_path / "my.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    loaded = load(ARCH, str(path))
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.preprocessing is None and loaded.categories is None  # --size decides


# --- timm ----------------------------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache; the hub is offline (fails at once, no retries)."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


def test_timm_pretrained_from_the_local_cache(hf_cache, picture, tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model("test_resnet").eval()
    repo = hf_cache / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              repo / "snapshots" / commit / "model.safetensors")

    loaded = load("timm:test_resnet", "DEFAULT")
    assert all(torch.equal(v, reference.state_dict()[k])
               for k, v in loaded.model.state_dict().items())
    assert len(loaded.categories) == 1000 and loaded.categories[0] == "tench"
    # preprocessing: timm's own eval transform of its data config
    config = timm.data.resolve_data_config({}, model=reference)
    expected = timm.data.create_transform(**config)(Image.open(picture).convert("RGB"))
    x, _, _ = loaded.preprocessing.batch([loaded.preprocessing.read(picture)])
    torch.testing.assert_close(x[0], expected)
    out = tmp_path / "out"
    assert main(["explain", str(picture), "--model", "timm:test_resnet", "--weights",
                 "DEFAULT", "--out", str(out)]) == 0
    row = next(csv.DictReader((out / "scores.csv").open()))
    assert row["class_name"] == loaded.categories[int(row["target"])]


def test_timm_missing_weights_say_what_to_do(hf_cache) -> None:
    with pytest.raises(RelpropError, match=r"not in the local cache.*hf download "
                       r"timm/test_resnet\.r160_in1k"):
        load("timm:test_resnet", "DEFAULT")
    with pytest.raises(RelpropError, match="unknown timm model"):
        load("timm:no_such_net")


# --- Hugging Face ----------------------------------------------------------------------------

LABELS = {0: "cat", 1: "dog", 2: "owl"}


def save_hf_classifier(folder: Path, kind: str) -> Path:
    """A tiny Hugging Face ResNet or ConvNeXt classifier and its image processor."""
    import transformers

    labels = {"num_labels": 3, "id2label": LABELS,
              "label2id": {v: k for k, v in LABELS.items()}}
    torch.manual_seed(4)
    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                           depths=[1, 1], layer_type="basic", **labels)
        transformers.ResNetForImageClassification(config).save_pretrained(folder)
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1],
                                             num_stages=2, **labels)
        transformers.ConvNextForImageClassification(config).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875,
                                        image_mean=[0.4, 0.5, 0.6],
                                        image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return save_hf_classifier(tmp_path_factory.mktemp("hf_resnet"), "resnet")


def test_hf_classifier_from_a_folder(hf_folder, picture) -> None:
    import transformers

    loaded = load(f"hf:{hf_folder}")
    assert isinstance(loaded.model, Logits) and not loaded.model.training
    assert loaded.categories == ["cat", "dog", "owl"]
    processor = transformers.AutoImageProcessor.from_pretrained(hf_folder)
    expected = processor(images=Image.open(picture).convert("RGB"),
                         return_tensors="pt")["pixel_values"]
    x, low, high = loaded.preprocessing.batch([loaded.preprocessing.read(picture)])
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(low.flatten(), torch.tensor([-2.0, -2.0, -2.0]))
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), hf_model(pixel_values=x).logits)


def test_hf_missing_model_is_one_clear_error(hf_cache) -> None:
    with pytest.raises(RelpropError, match="from local files.*save_pretrained"):
        load("hf:nobody/no-such-model")


def test_hf_classifier_explained_from_the_command_line(tmp_path, picture) -> None:
    folder = save_hf_classifier(tmp_path / "hf_convnext", "convnext")
    out = tmp_path / "out"
    assert main(["explain", str(picture), "--model", f"hf:{folder}", "--target", "top2",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["class_name"] for r in rows] == [LABELS[int(r["target"])] for r in rows]
    loaded = load(f"hf:{folder}")
    x, _, _ = loaded.preprocessing.batch([loaded.preprocessing.read(picture)])
    with torch.no_grad():
        logits = loaded.model(x)[0]
    for r in rows:
        assert float(r["logit"]) == pytest.approx(float(logits[int(r["target"])]), abs=1e-5)
        assert np.isfinite(float(r["relevance_sum"]))
