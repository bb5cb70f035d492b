"""Conditional relevance (relprop.concepts, CRP): conservation, the ledger, the layer names,
concepts as channels, neurons, heads and directions, one forward pass, per-concept
relevance. The zennit-crp oracle is in test_concepts_oracle.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import relprop
import relprop.concepts as rc
from relprop.concepts import ConceptError
from relprop.program import Program


def cnn() -> nn.Module:
    """A small VGG-like CNN in float64 with biases and a BatchNorm that folds into its conv."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)).double().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                mod.bias.normal_(0, 0.1)
        m[3].running_mean.normal_(0, 0.2)
        m[3].running_var.uniform_(0.5, 1.5)
    return m


class Residual(nn.Module):
    """A residual CNN: `body` has a skip around it, `stem` and `head` do not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.body(h))
        return self.head(h.mean((2, 3)))


def residual() -> nn.Module:
    torch.manual_seed(1)
    return Residual().double().eval()


X = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layer", ["2", "3", "6", "10"])
@pytest.mark.parametrize("exclude", [True, False])
def test_channels_of_a_layer_every_path_passes_add_up(layer: str, exclude: bool) -> None:
    """On a layer every path passes through, the maps of all its channels add up to the
    unconditional map (both flavours; "3" is the BatchNorm folded into conv "2"); with two
    targets per sample, K maps per target."""
    explainer = relprop.Explainer(cnn(), "epsilon_plus")
    full = explainer(X, target=[[1, 4]]).relevance
    expl = rc.explain(explainer, X, [[1, 4]], condition={layer: "all"}, exclude_parallel=exclude)
    width = {"2": 12, "3": 12, "6": 16, "10": 24}[layer]
    assert expl.relevance.shape == (2, 2, width, 3, 8, 8)
    torch.testing.assert_close(expl.relevance.sum(2), full, rtol=0, atol=1e-12)
    # each map's relevance at the layer: the channel's share of what arrived there
    at_layer = rc.relevance(explainer, X, [[1, 4]], layer).relevance
    torch.testing.assert_close(expl.concept_relevance, at_layer, rtol=0, atol=1e-12)


def test_concept_maps_sum_to_their_relevance_less_what_the_ledger_books_below() -> None:
    """With record=True the ledger of each concept's pass books what biases and
    stabilizers take below the layer: the map adds up to the concept's relevance at the
    layer less exactly that."""
    model = cnn()
    explainer = relprop.Explainer(model, "epsilon", epsilon=0.05)
    x = X[:1]
    ids = [i for i, _, _ in rc.relevance(explainer, x, 3, "6").top(3, by="abs")]
    expl = explainer(x, target=3, condition={"6": ids}, record=True)
    nodes = [e.node for e in expl.ledger]
    below = nodes[:nodes.index("_6") + 1]  # the layer's own balance is booked below it
    for k in range(3):
        leaked = sum(expl.ledger[n].leaked[0, k] for n in below)
        total = expl.relevance[0, k].sum()
        assert abs(float(leaked)) > 1e-4  # epsilon 0.05 and the biases take a visible part
        torch.testing.assert_close(total, expl.concept_relevance[0, k] - leaked, rtol=0,
                                   atol=1e-12)
    # the recorded relevance at the layer is the concept's: one channel only
    at = expl.layers["_6"][0]  # (K, C, H, W)
    assert torch.count_nonzero(at[0].abs().sum((1, 2))) <= 1
    torch.testing.assert_close(at.sum((1, 2, 3)), expl.concept_relevance[0], rtol=0,
                               atol=1e-12)


def test_residual_flavours() -> None:
    """Beside a skip, exclude_parallel=True keeps what flows through the concept only: the
    channels of the branch add up to the unconditional map less what passes the skip;
    exclude_parallel=False adds that same skip share to every map."""
    explainer = relprop.Explainer(residual(), "epsilon_plus")
    full = explainer(X, target=2).relevance
    own = rc.explain(explainer, X, 2, condition={"body.2": "all"})
    both = rc.explain(explainer, X, 2, condition={"body.2": "all"}, exclude_parallel=False)
    skip = both.relevance - own.relevance  # (B, K, ...): the same for every channel
    torch.testing.assert_close(skip, skip[:, :1].expand_as(skip), rtol=0, atol=1e-12)
    assert skip.abs().max() > 1e-3
    torch.testing.assert_close(own.relevance.sum(1) + skip[:, 0], full, rtol=0, atol=1e-12)
    # the stem is on every path: both flavours agree and its channels add up
    a = rc.explain(explainer, X, 2, condition={"stem": "all"})
    b = rc.explain(explainer, X, 2, condition={"stem": "all"}, exclude_parallel=False)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.relevance.sum(1), full, rtol=0, atol=1e-12)


def test_joint_conditions_and_products() -> None:
    """A list of dicts: one map each, several ids of a layer are one concept (their
    union); a dict over two layers: every combination. Joint over a layer every path
    passes: summing the lower layer's channels gives the upper concept's map."""
    explainer = relprop.Explainer(cnn(), "epsilon_plus")
    upper = rc.explain(explainer, X, 1, condition={"6": [4, 7]})
    product = rc.explain(explainer, X, 1, condition={"6": [4, 7], "2": "all"})
    assert product.relevance.shape == (2, 24, 3, 8, 8)
    assert product.conditions[13] == {"6": "7", "2": "1"}
    sums = product.relevance.unflatten(1, (2, 12)).sum(2)
    torch.testing.assert_close(sums, upper.relevance, rtol=0, atol=1e-12)
    joint = rc.explain(explainer, X, 1, condition=[{"6": [4, 7], "2": [0, 3]}, {"6": 4}])
    assert joint.conditions == [{"6": "4+7", "2": "0+3"}, {"6": "4"}]
    expected = product.relevance[:, [0, 3, 12, 15]].sum(1)
    torch.testing.assert_close(joint.relevance[:, 0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(joint.relevance[:, 1], upper.relevance[:, 0], rtol=0,
                               atol=1e-12)


def test_one_forward_pass_and_concept_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seven concepts take one forward pass, whether concepts share backward passes
    (concept_batch=3: the input repeated three times in that one pass) or not."""
    explainer = relprop.Explainer(cnn(), "epsilon_plus")
    calls = []
    original = Program.run

    def counting(self, inputs, *args, **kwargs):
        calls.append(inputs[0].shape[0])
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Program, "run", counting)
    ids = [0, 2, 3, 5, 8, 11, 15]
    one = rc.explain(explainer, X, [3, 6], condition={"6": ids}, concept_batch=1)
    three = rc.explain(explainer, X, [3, 6], condition={"6": ids}, concept_batch=3)
    assert calls == [2, 6]
    torch.testing.assert_close(three.relevance, one.relevance, rtol=0, atol=1e-13)
    for k, c in enumerate(ids):  # one map per channel, each equal to its own explanation
        alone = rc.explain(explainer, X, [3, 6], condition={"6": [c]})
        torch.testing.assert_close(one.relevance[:, k], alone.relevance[:, 0], rtol=0,
                                   atol=1e-13)


def test_layer_names() -> None:
    """Module paths, the ledger's node names, a folded BatchNorm, a container and the
    input of a layer name the same places; an unknown name says what is close."""
    explainer = relprop.Explainer(cnn(), "epsilon_plus")
    by_path = rc.explain(explainer, X, 1, condition={"6": [2]}).relevance
    by_node = rc.explain(explainer, X, 1, condition={"_6": [2]}).relevance
    by_relu = rc.explain(explainer, X, 1, condition={"7": [2]}).relevance  # after the ReLU
    torch.testing.assert_close(by_node, by_path, rtol=0, atol=0)
    torch.testing.assert_close(by_relu, by_path, rtol=0, atol=1e-13)
    by_input = rc.explain(explainer, X, 1, condition={"10:input": [2 * 4 + 1]}).relevance
    by_pool = rc.explain(explainer, X, 1, condition={"9": [9]}).relevance  # flatten: (B, 64)
    torch.testing.assert_close(by_input, by_pool, rtol=0, atol=0)
    outer = relprop.Explainer(nn.Sequential(cnn()).double(), "epsilon_plus")
    logits = rc.explain(outer, X, 1, condition={"0": [1, 3]}).relevance  # its output
    torch.testing.assert_close(logits[:, 0], explainer(X, 1).relevance, rtol=0, atol=1e-12)
    assert logits[:, 1].abs().max() == 0  # logit 3 is not the one explained
    with pytest.raises(ConceptError, match="no layer 'features.6'"):
        rc.explain(explainer, X, 1, condition={"features.6": [0]})
    with pytest.raises(ConceptError, match="does not exist: the layer has 16"):
        rc.explain(explainer, X, 1, condition={"6": [16]})
    with pytest.raises(ConceptError, match="dict"):
        rc.explain(explainer, X, 1, condition=[3])


def test_directions_and_heads() -> None:
    """Directions: an orthonormal basis splits relevance exactly, a one-hot direction is its
    channel. Heads: slices of a layer's features; all heads add up."""
    explainer = relprop.Explainer(cnn(), "epsilon_plus")
    full = explainer(X, target=5).relevance
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    basis = rc.explain(explainer, X, 5, condition={"7": q.T})
    torch.testing.assert_close(basis.relevance.sum(1), full, rtol=0, atol=1e-12)
    at = rc.relevance(explainer, X, 5, "7")
    torch.testing.assert_close(basis.concept_relevance.sum(1), at.relevance.sum(1), rtol=0,
                               atol=1e-12)
    scaled = torch.zeros(2, 16, dtype=torch.float64)
    scaled[0, 3], scaled[1, 9] = 2.0, -0.5  # a direction's length and sign do not matter
    onehot = rc.explain(explainer, X, 5, condition={"7": rc.directions(scaled)})
    channels = rc.explain(explainer, X, 5, condition={"7": [3, 9]})
    torch.testing.assert_close(onehot.relevance, channels.relevance, rtol=0, atol=1e-13)
    heads = rc.explain(explainer, X, 5, condition={"10:input": rc.heads(4)})
    assert heads.conditions[1] == {"10:input": "head 1"}
    torch.testing.assert_close(heads.relevance.sum(1), full, rtol=0, atol=1e-12)
    per_head = rc.relevance(explainer, X, 5, "10:input", concepts=rc.heads(4))
    per_feature = rc.relevance(explainer, X, 5, "10:input").relevance
    torch.testing.assert_close(per_head.relevance, per_feature.unflatten(1, (4, 16)).sum(2),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(heads.concept_relevance, per_head.relevance, rtol=0,
                               atol=1e-12)


def test_concept_relevance_top_and_shares() -> None:
    """(B, C) relevance per channel: the channels add up to the relevance at the layer;
    top() orders them, shares divide by the explained value."""
    explainer = relprop.Explainer(cnn(), "epsilon", epsilon=1e-9)
    got = rc.relevance(explainer, X, [2, 7], ["6", "10"])
    layer = explainer(X, target=[2, 7], record=True).layers["_6"]
    torch.testing.assert_close(got["6"].relevance, layer.sum((2, 3)), rtol=0, atol=1e-12)
    r = got["10"]
    assert r.relevance.shape == (2, 24)
    top = r.top(3, sample=1)
    assert [t[1] for t in top] == sorted(r.relevance[1].tolist(), reverse=True)[:3]
    assert top[0][2] == pytest.approx(top[0][1] / float(r.explained[1]))
    assert r.shares.sum(1).tolist() == pytest.approx(
        (r.relevance.sum(1) / r.explained).tolist())
    assert "share" in r.table(4)
    # the same from an explanation: its input and targets, at any layer
    expl = explainer(X, target=[2, 7])
    torch.testing.assert_close(expl.concepts("10").relevance, r.relevance, rtol=0, atol=0)
    with pytest.raises(relprop.RelpropError, match="does not know its model"):
        dataclasses.replace(expl, _source=None).concepts("10")


def test_attribution_graph() -> None:
    """Each edge is the relevance a lower channel gets through the upper concept (and the
    root): what record=True shows at the lower layer under that joint condition."""
    explainer = relprop.Explainer(cnn(), "epsilon_plus")
    x = X[:1]
    root = rc.relevance(explainer, x, 3, "6").top(1)[0][0]
    g = rc.graph(explainer, x, 3, layer="6", concept=root, lower=["2", "0"], width=[3, 2])
    assert g.nodes[0].layer == "6" and len([n for n in g.nodes if n.layer == "2"]) == 3
    level1 = explainer(x, target=3, condition={"6": [root]}, record=True).layers["_2"]
    per_channel = level1[0, 0].sum((1, 2))
    assert [e.target[1] for e in g.edges[:3]] == per_channel.argsort(descending=True)[:3].tolist()
    for e in g.edges:
        if e.source[0] == "6":
            assert e.relevance == pytest.approx(float(per_channel[e.target[1]]), abs=1e-12)
        else:
            joint = explainer(x, target=3, condition=[{"6": root, "2": e.source[1]}],
                              record=True).layers["_0"][0, 0].sum((1, 2))
            assert e.relevance == pytest.approx(float(joint[e.target[1]]), abs=1e-12)
            assert e.share == pytest.approx(e.relevance / float(per_channel[e.source[1]]))
    assert "->" in g.to_dot() and g.to_svg().startswith("<svg")


@pytest.mark.slow  # tracing the tiny LLaMA alone takes about 11 s of CPU
def test_transformer_heads_and_mlp_neurons() -> None:
    """A tiny LLaMA's attention heads (the head slices of o_proj's input) and MLP neurons
    (down_proj's input) as concepts of a next-token prediction: beside the residual
    stream, each concept's own maps add up to the token relevance less what passes the
    skip, and exclude_parallel=False adds that skip share to every map; per-head relevance
    sums the heads' features."""
    from reference_attnlrp import tiny_llama

    ids = torch.tensor([[3, 7, 11, 2, 9, 14, 5], [1, 2, 3, 4, 5, 6, 7]])
    explainer = relprop.Explainer(tiny_llama(0, "sdpa"), "attnlrp")
    full = explainer(ids, target=4).relevance
    # LLaMA's RMSNorm computes in float32 (its gradient too): sums agree to float32's grain
    grain = 1e-6 * float(full.abs().max())
    for layer, concepts, k in (("model.layers.0.self_attn.o_proj:input", rc.heads(4), 4),
                               ("model.layers.1.mlp.down_proj:input", "all", 64)):
        own = rc.explain(explainer, ids, 4, condition={layer: concepts})
        both = rc.explain(explainer, ids, 4, condition={layer: concepts},
                          exclude_parallel=False)
        skip = both.relevance - own.relevance
        assert own.relevance.shape == (2, k, 7)
        assert skip.abs().max() > 1e3 * grain
        torch.testing.assert_close(skip, skip[:, :1].expand_as(skip), rtol=0, atol=grain)
        torch.testing.assert_close(own.relevance.sum(1) + skip[:, 0], full, rtol=0,
                                   atol=grain)
    heads = rc.relevance(explainer, ids, 4, "model.layers.1.self_attn.o_proj:input",
                         concepts=rc.heads(4))
    neurons = rc.relevance(explainer, ids, 4, "model.layers.1.self_attn.o_proj:input")
    torch.testing.assert_close(heads.relevance, neurons.relevance.unflatten(1, (4, 8)).sum(2),
                               rtol=0, atol=1e-12)
    assert heads.labels == [f"head {h}" for h in range(4)] and len(heads.top(2)) == 2
