"""Dataset-wide analysis on a planted Clever Hans: real MNIST digits, a 2x2 white stamp
somewhere in the top-left 4x4 pixels of 80% of the 8s (3% of the others), the shipped small
CNN architecture trained on them for 3 epochs. SpRAy finds the stamped 8s, ClArC removes
the stamp's direction, PCX gives them their own prototype, the CLI writes it all down."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checks import chromium_dom, images_decoded
from sklearn.metrics import adjusted_rand_score

import relprop
from relprop.apps.analyze.planted import (
    PlantedDigits,
    add_mark,
    mark_mask,
    planted_mnist,
    remove_mark,
    shortcut_report,
    train_planted_cnn,
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The trained model and the 8s of the training digits explained (LRP, whole maps)."""
    torch.manual_seed(0)
    train, test = planted_mnist("train"), planted_mnist("test")
    model = train_planted_cnn(train, epochs=3)
    eights = train.y == 8
    data = PlantedDigits(train.x[eights], train.y[eights], train.marked[eights])
    out = tmp_path_factory.mktemp("expl")
    relprop.explain_dataset(model, data, out, "epsilon_gamma_box", target="label",
                            batch_size=128, shard_size=128, progress=False, low=0.0, high=1.0)
    return {"train": train, "test": test, "model": model, "eights": data, "out": out}


@pytest.fixture(scope="module")
def sprayed(planted):
    from relprop.analysis import spray

    return spray(planted["out"], classes=[8], tsne=False)


def test_planted_model_learns_the_shortcut(planted) -> None:
    train = planted["train"]
    assert 0.75 < train.marked[train.y == 8].float().mean() < 0.85
    assert train.marked[train.y != 8].float().mean() < 0.05
    r = shortcut_report(planted["model"], planted["test"])
    assert r["others_clean"] > 0.93  # it reads digits...
    assert r["class_marked"] > r["class_unmarked"] + 0.08  # ...and the stamp says "8"
    assert r["others_marked_called_class"] > 0.03


def test_spray_separates_the_stamped_eights(planted, sprayed) -> None:
    a = sprayed[8]
    marked = planted["eights"].marked[a.indices].numpy()
    assert adjusted_rand_score(marked, a.clusterings["kmeans-2"]) >= 0.8
    assert adjusted_rand_score(marked, a.clusterings["agglomerative-2"]) >= 0.8
    # the spectrum: a second eigenvalue near 0, the third clearly above it
    assert a.eigenvalues[0] < 1e-6 and a.eigenvalues[1] < 0.01 and a.eigenvalues[2] > 0.04
    assert a.suggested_k == 2
    # members from Python: one cluster is (almost) all stamped, the other (almost) none
    members = sprayed.members(8, 2)
    purity = sorted(planted["eights"].marked[idx].float().mean().item()
                    for idx in members.values())
    assert purity[0] < 0.1 and purity[1] > 0.9
    assert sum(len(v) for v in members.values()) == len(planted["eights"])


def test_spray_file_reads_back_and_plots(planted, sprayed, tmp_path) -> None:
    from PIL import Image

    from relprop.analysis import load_spray

    again = load_spray(planted["out"])
    assert again.path == planted["out"] / "spray.h5"
    np.testing.assert_array_equal(again[8].clusterings["kmeans-2"],
                                  sprayed[8].clusterings["kmeans-2"])
    np.testing.assert_allclose(again[8].eigenvalues, sprayed[8].eigenvalues)
    png = again.eigenvalue_plot(tmp_path / "eig.png")
    assert Image.open(png).size[0] > 300


def test_fine_gradient_x_input_and_corelay_defaults_do_worse(planted, sprayed) -> None:
    """Side by side on the same 8s: SpRAy's settings on LRP maps pooled to 7x7 against
    gradient x input at full resolution (28x28), and against CoRelAy's default pipeline."""
    from relprop.analysis.spray import (
        SpraySettings,
        analyse_class,
        corelay_default_clusters,
        pool_maps,
    )
    from relprop.evaluate import baselines

    a = sprayed[8]
    data = planted["eights"]
    marked = data.marked[a.indices].numpy()
    x = data.x[a.indices]
    gxi = baselines(planted["model"], x, 8)["gradient_x_input"]
    fine = SpraySettings(grid=28, tsne=False, agglomerative=False)
    b = analyse_class(8, a.indices, pool_maps(gxi, 28).double().numpy(), fine)
    ours = adjusted_rand_score(marked, a.clusterings["kmeans-2"])
    theirs = adjusted_rand_score(marked, b.clusterings["kmeans-2"])
    assert ours >= 0.8 and theirs < 0.5, (ours, theirs)
    # fine maps fall apart: many eigenvalues at 0, no gap after the second
    assert (b.eigenvalues < 1e-6).sum() >= 3
    default = adjusted_rand_score(marked, corelay_default_clusters(a.features))
    assert default < 0.5, default


def test_clarc_removes_the_stamp(planted) -> None:
    from relprop.analysis import clarc

    model, train, test = planted["model"], planted["train"], planted["test"]
    before_params = {k: v.clone() for k, v in model.state_dict().items()}
    clean8 = remove_mark(train.x[train.y == 8])
    eights = test.y == 8
    result = clarc(model, "features", add_mark(clean8, seed=5), clean8,
                   clean=(remove_mark(test.x[eights]), test.y[eights]),
                   marked=(add_mark(test.x[eights], seed=3), test.y[eights]),
                   mask=mark_mask(), low=0.0, high=1.0)
    assert result.model is not model
    after_params = model.state_dict()
    assert all(torch.equal(before_params[k], after_params[k]) for k in before_params)
    rep = result.report
    # the relevance on the stamp is cut by at least half
    assert rep["after"]["artifact_relevance"] <= 0.5 * rep["before"]["artifact_relevance"]
    # the 8s no longer depend on the stamp; the unstamped ones lose nothing
    assert rep["before"]["accuracy_marked"] - rep["before"]["accuracy_clean"] > 0.08
    assert abs(rep["after"]["accuracy_marked"] - rep["after"]["accuracy_clean"]) <= 0.02
    assert rep["after"]["accuracy_clean"] >= rep["before"]["accuracy_clean"]
    before, after = shortcut_report(model, test), shortcut_report(result.model, test)
    assert after["others_clean"] >= before["others_clean"] - 0.01  # at most 1 point elsewhere
    assert after["others_marked_called_class"] < 0.01 < before["others_marked_called_class"]


def test_pcx_gives_the_stamped_eights_their_own_prototype(planted) -> None:
    """PCX over channel relevance after the first block (relprop.concepts), every 8; and the
    concept the stamped 8s use more than the others is a channel that fires on the stamp."""
    from relprop.analysis.prototypes import concept_vectors, prototypes

    data, model = planted["eights"], planted["model"]
    vectors = concept_vectors(model, data.x, "features.2", 8, composite="epsilon_gamma_box",
                              low=0.0, high=1.0)
    assert vectors.shape == (len(data), 16)
    p = prototypes(vectors, data.y, torch.arange(len(data))).classes[8]
    marked = data.marked.numpy()
    share = [marked[p.assignment == j].mean() for j in range(2)]
    stamp = int(np.argmax(share))
    assert share[stamp] >= 0.9 and share[1 - stamp] <= 0.25, share
    assert (p.assignment[marked] == stamp).mean() >= 0.9
    assert data.marked[torch.as_tensor(p.typical[stamp][:10])].all()
    assert not data.marked[torch.as_tensor(p.typical[1 - stamp][:5])].any()
    use = p.usage(0)
    assert len(use["over"]) == 3 and set(use["over"]).isdisjoint(use["under"])
    assert len(p.outliers(5)) == 5
    # the channel named by relevance fires on the stamp: among the 3 channels whose
    # activation in the top-left corner (2x2 of 14x14) rises most with the stamp
    v = vectors / vectors.sum(1, keepdim=True)  # shares of each sample's relevance
    named = int((v[data.marked].mean(0) - v[~data.marked].mean(0)).argmax())
    with torch.no_grad():
        corner = model.features[:3](data.x)[:, :, :2, :2].amax((2, 3))
    rise = corner[data.marked].mean(0) - corner[~data.marked].mean(0)
    assert named in rise.argsort(descending=True)[:3].tolist()


def test_virelay_project_loads_in_virelay(planted, sprayed) -> None:
    """The export through ViRelAy's own project loader and its REST API (Flask test client)."""
    from virelay.model import Workspace
    from virelay.server import Server

    from relprop.analysis import export_virelay

    project = export_virelay(planted["out"], dataset=planted["eights"])
    workspace = Workspace()
    workspace.add_project(str(project))
    try:
        loaded = workspace.get_project(workspace.get_project_names()[0])
        assert loaded.get_analysis_methods() == ["spectral"]
        assert [c.name for c in loaded.get_analysis_categories("spectral")] == ["8"]
        assert "kmeans-2" in loaded.get_analysis_clustering_names("spectral")
        analysis = loaded.get_analysis("spectral", "8", "kmeans-2", "spectral")
        np.testing.assert_array_equal(analysis.clustering, sprayed[8].clusterings["kmeans-2"])
        attribution = loaded.get_attribution(3)
        stored = relprop.load_explanations(planted["out"])[3]["relevance"]
        np.testing.assert_allclose(attribution.data.sum(-1), stored.sum(0).numpy(), atol=1e-6)
        client = Server(workspace).app.test_client()
        assert client.get("/api/projects/0").json["analysisMethods"][0]["name"] == "spectral"
        image = client.get("/api/projects/0/attributions/3/heatmap?colorMap=blue-white-red")
        assert image.status_code == 200 and image.mimetype == "image/jpeg"
    finally:
        workspace.close()


def test_analyze_command_writes_the_analysis_and_page(planted, capsys) -> None:
    from relprop.apps.cli import main

    out = planted["out"]
    assert main(["analyze", str(out), "--classes", "8", "--no-tsne", "--ks", "2,3"]) == 0
    printed = capsys.readouterr()
    assert "class 8:" in printed.out and "eigengap k=2" in printed.out
    assert (out / "spray_eigenvalues.png").exists() and (out / "spray.h5").exists()
    page = (out / "analysis.html").read_text()
    assert "Class 8" in page and page.count("<img") == 1 + 2 * (1 + 8)  # spectrum, clusters
    # a tensor dataset has no image files for ViRelAy: one clear line
    assert main(["analyze", str(out), "--classes", "8", "--no-tsne", "--virelay"]) == 2
    assert "needs the images" in capsys.readouterr().err


def test_virelay_opens_the_project_in_a_browser(planted, sprayed, tmp_path) -> None:
    """`python -m virelay project.yaml` serves the export; headless Chromium shows the class,
    both clusters with their sizes, and the selected samples' heatmaps."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from relprop.analysis import export_virelay

    project = export_virelay(planted["out"], tmp_path / "virelay", dataset=planted["eights"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "virelay", str(project), "--host",
                               "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # up to 60 s for the server to answer
            try:
                urllib.request.urlopen(f"{base}/api/projects", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        members = sprayed.members(8, 2)
        picked = [int(members[0][0]), int(members[1][0])]
        dom = chromium_dom(
            f"{base}/projects/0?analysisMethod=spectral&analysisCategory=8&clustering=kmeans-2"
            f"&embedding=spectral&imageMode=Attribution&embeddingVectors={picked[0]},{picked[1]}",
            tmp_path / "profile", budget_ms=20000)  # ViRelAy's page loads its data first
        assert "8 (8)" in dom  # the class, named from the label map
        for k, idx in members.items():
            assert f"Cluster {k + 1} ({len(idx)})" in dom
        for i in picked:
            src = f"/api/projects/0/attributions/{i}/heatmap"
            assert src in dom
            reply = urllib.request.urlopen(f"{base}{src}?colorMap=black-fire-red", timeout=10)
            assert reply.headers["Content-Type"] == "image/jpeg" and len(reply.read()) > 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_summary_page_shows_its_pictures_in_a_browser(planted, sprayed, tmp_path) -> None:
    from relprop.apps.analyze.page import summary_page

    page = summary_page(sprayed, tmp_path / "analysis.html", dataset=planted["eights"],
                        thumbnails=3)
    total, ok = images_decoded(page, tmp_path / "profile")
    assert total == 1 + 2 * (1 + 3 * 2) and ok == total  # spectrum; means, inputs, heatmaps


def test_analyze_virelay_from_image_files(tmp_path, capsys) -> None:
    """An explain-dataset run over an ImageFolder: `relprop analyze --virelay` takes the
    images from the manifest's paths; ViRelAy shows the very pixels and the class names."""
    from PIL import Image
    from torch import nn
    from virelay.model import Workspace

    from relprop.apps.cli import main
    from relprop.apps.datasets import load_mnist
    from relprop.dataset import ImageFiles

    x, y = load_mnist("test")
    for c in (3, 7):
        folder = tmp_path / "images" / f"digit{c}"
        folder.mkdir(parents=True)
        for j, i in enumerate(torch.nonzero(y == c).ravel()[:8].tolist()):
            grey = (x[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(grey).convert("RGB").save(folder / f"{j}.png")
    data = ImageFiles(tmp_path / "images", size=None, normalize=False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 28 * 28, 2)).eval()
    out = tmp_path / "expl"
    relprop.explain_dataset(model, data, out, "epsilon_plus", target="label", batch_size=8,
                            shard_size=8, progress=False)
    assert main(["analyze", str(out), "--no-tsne", "--ks", "2", "--virelay"]) == 0
    project = out / "virelay" / "project.yaml"
    assert f"python -m virelay {project}" in capsys.readouterr().err
    workspace = Workspace()
    workspace.add_project(str(project))
    try:
        loaded = workspace.get_project(workspace.get_project_names()[0])
        assert [c.human_readable_name for c in loaded.get_analysis_categories("spectral")] == \
            ["digit3", "digit7"]
        sample = loaded.get_sample(9)  # the second folder's second image
        png = np.asarray(Image.open(data.samples[9][0]).convert("RGB"))
        np.testing.assert_array_equal(sample.data, png)
        assert sample.labels[0].name == "digit7"
    finally:
        workspace.close()


def test_missing_analysis_extra_says_how_to_install(monkeypatch) -> None:
    import sys

    from relprop.analysis.spray import SpraySettings, spectral_embedding
    from relprop.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "corelay", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'relprop\[analysis\]'"):
        spectral_embedding(np.random.default_rng(0).random((20, 49)), SpraySettings())
