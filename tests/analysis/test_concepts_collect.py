"""Reference samples (relprop.concepts.collect / load): the top-n per channel equal a
brute-force loop (one explanation per sample, then a sort), batches and shards do not
change them, a stopped run resumes, the per-class means and receptive fields are right.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import relprop
import relprop.concepts as rc
from relprop.errors import RelpropError


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def data(n: int = 26) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,),
                                                                               generator=g))


LAYERS = {"3": "_3", "6": "_6", "4": "_4"}  # conv, dense, the ReLU after the conv


def brute_force(model: nn.Module, dataset: TensorDataset) -> dict[tuple[str, str], torch.Tensor]:
    """Per layer and measure, (N, C) scores: one explanation per sample (record=True: the
    relevance at every node), activations from forward hooks on the modules."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(k).register_forward_hook(
        lambda m, i, o, k=k: acts.__setitem__(k, o.detach())) for k in LAYERS]
    out: dict[tuple[str, str], list[torch.Tensor]] = {}
    for i in range(len(dataset)):
        x = dataset[i][0][None]
        model(x)  # relprop runs its own program: the hooks see this forward pass
        expl = relprop.explain(model, x, target=None, composite="epsilon_plus", record=True)
        for key, node in LAYERS.items():
            r = expl.layers[node].reshape(1, acts[key].shape[1], -1)[0]
            a = acts[key].reshape(1, acts[key].shape[1], -1)[0]
            for m, v in (("relevance", r.sum(1)), ("relevance_max", r.amax(1)),
                         ("activation", a.sum(1)), ("activation_max", a.amax(1))):
                out.setdefault((key, m), []).append(v)
    for h in hooks:
        h.remove()
    return {k: torch.stack(v) for k, v in out.items()}


def test_top_n_equal_a_brute_force_loop(tmp_path: Path) -> None:
    model, dataset = cnn(), data()
    summary = rc.collect(model, dataset, list(LAYERS), tmp_path / "refs", "epsilon_plus",
                         n=5, batch_size=3, shard_size=8, progress=False)
    assert summary.shards_written == [0, 1, 2, 3]
    refs = rc.load(tmp_path / "refs")
    expected = brute_force(model, dataset)
    for (key, m), s in expected.items():
        for c in range(s.shape[1]):
            order = sorted(range(len(s)), key=lambda i: (-float(s[i, c]), i))[:5]
            top = refs.top(key, c, by=m)
            assert top.indices.tolist() == order, (key, m, c)
            torch.testing.assert_close(top.scores, s[order, c], rtol=1e-5, atol=1e-6)
    assert len(refs.top("3", 2, n=2)) == 2
    # per class of the explained (predicted) target: the mean relevance per channel
    preds = model(dataset.tensors[0]).argmax(1)
    classes, means = refs.class_relevance("6")
    for j, c in enumerate(classes):
        mask = preds == c
        torch.testing.assert_close(means[j].float(),
                                   expected["6", "relevance"][mask].mean(0),
                                   rtol=1e-5, atol=1e-6)
    assert refs.target(7) == int(preds[7]) and refs.label(7) == int(dataset[7][1])
    with pytest.raises(RelpropError, match="was not collected"):
        refs.top("0", 0)


def test_resume_and_batches_do_not_change_the_result(tmp_path: Path) -> None:
    """Another batch size, a folder whose last shard and merged file were lost (a stop
    before the end), and a resumed run give the same references."""
    model, dataset = cnn(), data()
    rc.collect(model, dataset, ["3"], tmp_path / "a", n=4, batch_size=8, shard_size=8,
               target="label", progress=False)
    first = rc.collect(model, dataset, ["3"], tmp_path / "b", n=4, batch_size=5,
                       shard_size=8, target="label", progress=False)
    assert first.shards_written == [0, 1, 2, 3]
    for name in ("shard-000003.safetensors", "references.safetensors", "manifest.json"):
        (tmp_path / "b" / name).unlink()
    again = rc.collect(model, dataset, ["3"], tmp_path / "b", n=4, batch_size=5,
                       shard_size=8, target="label", progress=False)
    assert again.shards_skipped == [0, 1, 2] and again.shards_written == [3]
    a, b = rc.load(tmp_path / "a"), rc.load(tmp_path / "b")
    for m in rc.MEASURES:
        for c in range(6):
            assert a.top("3", c, m).indices.tolist() == b.top("3", c, m).indices.tolist()
    with pytest.raises(RelpropError, match="another run"):
        rc.collect(model, dataset, ["3"], tmp_path / "b", n=5, shard_size=8, progress=False)


def test_receptive_field() -> None:
    """The box of input pixels a unit reads: where the model's own gradient of that unit
    (a forward hook on the module) is not zero."""
    model = cnn()
    x = (torch.rand(1, 3, 8, 8) + 0.1).requires_grad_(True)
    kept = {}
    hook = model[3].register_forward_hook(lambda m, i, o: kept.__setitem__("v", o))
    model(x)
    hook.remove()
    for channel, position in ((1, 1 * 4 + 2), (5, 0), (7, 15)):
        (g,) = torch.autograd.grad(kept["v"][0, channel].reshape(-1)[position], x,
                                   retain_graph=True)
        nz = g.abs().sum(1)[0].nonzero()
        box = (int(nz[:, 0].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].min()),
               int(nz[:, 1].max()) + 1)
        assert rc.receptive_field(model, x, "3", channel, position) == box
        assert box[1] - box[0] < 8 or box[3] - box[2] < 8  # a window, not the whole image
