"""Every target form of the README's "Targets and starting relevance", resolved without a
model: relprop.targets is pure functions of the target and the output."""

from __future__ import annotations

import pytest
import torch

import relprop
from relprop import RelpropError, TargetError, targets

B, N = 3, 5


@pytest.fixture
def output() -> torch.Tensor:
    return torch.tensor([[0.1, 2.0, -1.0, 0.5, 0.3],
                         [3.0, 0.2, 0.1, -0.4, 1.0],
                         [0.0, -2.0, 0.7, 0.9, 0.8]])


def test_none_is_each_samples_predicted_class(output) -> None:
    index, multi = targets.resolve(None, output)
    assert index.tolist() == [[1], [0], [3]] and not multi


def test_an_int_is_the_same_class_for_every_sample(output) -> None:
    index, multi = targets.resolve(4, output)
    assert index.tolist() == [[4]] * B and not multi
    index, multi = targets.resolve(torch.tensor(2), output)  # a 0-d tensor alike
    assert index.tolist() == [[2]] * B and not multi


@pytest.mark.parametrize("given", [[2, 0, 4], torch.tensor([2, 0, 4])])
def test_a_list_or_1d_tensor_is_one_class_per_sample(output, given) -> None:
    index, multi = targets.resolve(given, output)
    assert index.tolist() == [[2], [0], [4]] and not multi


@pytest.mark.parametrize("given", [[[1, 2], [3, 4], [0, 0]],
                                   torch.tensor([[1, 2], [3, 4], [0, 0]])])
def test_a_nested_list_or_2d_tensor_is_k_classes_per_sample(output, given) -> None:
    index, multi = targets.resolve(given, output)
    assert index.tolist() == [[1, 2], [3, 4], [0, 0]] and multi


@pytest.mark.parametrize("given", [[[1, 3]], torch.tensor([[1, 3]])])
def test_one_row_of_k_classes_is_those_classes_for_every_sample(output, given) -> None:
    index, multi = targets.resolve(given, output)
    assert index.tolist() == [[1, 3]] * B and multi


def test_one_nested_class_keeps_the_target_dimension(output) -> None:
    index, multi = targets.resolve([[4]], output)
    assert index.tolist() == [[4]] * B and multi


def test_a_tuple_indexes_one_position_of_a_multi_dimensional_output() -> None:
    grid = torch.randn(2, 2, 3)  # flattened: position (i, j) is i * 3 + j
    index, multi = targets.resolve((1, 2), grid)
    assert index.tolist() == [[5], [5]] and not multi
    index, _ = targets.resolve((-1, 0), grid)  # negative positions count from the end
    assert index.tolist() == [[3], [3]]
    index, multi = targets.resolve([(0, 1), (1, 0)], grid)  # one tuple per sample
    assert index.tolist() == [[1], [3]] and not multi
    index, multi = targets.resolve([[(0, 1), 5], [(1, 1), 2]], grid)  # mixed, K per sample
    assert index.tolist() == [[1, 5], [4, 2]] and multi
    assert targets.flat_position((1, 1), (2, 3)) == 4
    assert targets.flat_position(4, (2, 3)) == 4


def test_output_relevance_needs_no_index_and_seeds_that_relevance(output) -> None:
    relevance = torch.randn(B, N)
    relevance[2, 0] = 0.0  # the output is 0 there
    index, multi = targets.resolve(None, output, relevance)
    assert index.tolist() == [[-1]] * B and not multi
    seeds = targets.seeds(output, index, "value", relevance)
    assert seeds.shape == (1, B, N)
    torch.testing.assert_close(seeds[0] * output, relevance, rtol=1e-6, atol=0)


@pytest.mark.parametrize("start", ["value", "one", "softmax"])
def test_the_seed_puts_the_chosen_start_at_each_target(output, start) -> None:
    index = torch.tensor([[1, 4], [0, 2], [3, 3]])
    seeds = targets.seeds(output, index, start)
    assert seeds.shape == (2, B, N)
    relevance = seeds * output  # what each target's backward pass starts with
    picked = relevance.gather(2, index.T[:, :, None])[..., 0]  # (K, B)
    expected = {"value": output.gather(1, index).T, "one": torch.ones(2, B),
                "softmax": output.softmax(1).gather(1, index).T}[start]
    torch.testing.assert_close(picked, expected)
    assert relevance.sum(2).sub(picked).abs().max() == 0  # nothing anywhere else


def test_softmax_start_of_a_sequence_is_over_the_vocabulary_at_the_position() -> None:
    """A (position, token) target of (B, T, V) logits starts at that position's
    probability, not a softmax over all T x V entries; a 4-d output is refused."""
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    rows = logits.reshape(2, -1)
    index = torch.tensor([[targets.flat_position((1, 3), (4, 6))], [5]])  # (B, K=1)
    seeds = targets.seeds(rows, index, "softmax", shape=(2, 4, 6))
    picked = (seeds[0] * rows).gather(1, index)[:, 0]
    want = torch.stack([logits[0, 1].softmax(-1)[3], logits[1, 0].softmax(-1)[5]])
    torch.testing.assert_close(picked, want, rtol=1e-12, atol=0)
    with pytest.raises(TargetError, match="class axis"):
        targets.seeds(rows, index, "softmax", shape=(2, 2, 2, 6))
    model = torch.nn.Linear(5, 6).double()  # (B, T, 5) -> (B, T, V) logits
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    expl = relprop.Explainer(model, "epsilon")(x, target=(1, 3), start="softmax")
    want = model(x)[:, 1].softmax(-1)[:, 3].detach()
    torch.testing.assert_close(expl.explained.reshape(-1), want, rtol=1e-9, atol=0)  # (p/z)*z


def test_class_targets_of_a_sequence_sit_at_the_position() -> None:
    logits = torch.randn(2, 4, 6)  # (B, T, V)
    assert targets.at_position(None, logits, -1) == logits[:, -1].argmax(-1).tolist()
    assert targets.at_position(3, logits, 2) == (2, 3)
    assert targets.at_position(torch.tensor([1, 5]), logits, 0) == [(0, 1), (0, 5)]
    assert targets.at_position([[1, (3, 2)]], logits, 1) == [[(1, 1), (3, 2)]]
    index, multi = targets.resolve(targets.at_position([1, 5], logits, -1), logits)
    assert index.tolist() == [[3 * 6 + 1], [3 * 6 + 5]] and not multi


def test_a_generating_models_default_position_is_the_last() -> None:
    class LM(torch.nn.Module):
        def can_generate(self) -> bool:
            return True

    logits = torch.randn(2, 4, 6)
    assert targets.default_position(LM(), logits, None) == -1
    assert targets.default_position(LM(), logits, 2) == 2
    assert targets.default_position(LM(), logits[:, 0], None) is None  # no sequence
    assert targets.default_position(torch.nn.Linear(2, 2), logits, None) is None


def test_chunks_split_per_sample_targets_only() -> None:
    first = slice(0, 2)
    assert targets.chunk([4, 1, 2], first, 3) == [4, 1]
    assert targets.chunk([[1, 2], [0, 1], [3, 3]], first, 3) == [[1, 2], [0, 1]]
    assert targets.chunk(torch.tensor([[1, 2], [0, 1], [3, 3]]), first, 3).tolist() == [
        [1, 2], [0, 1]]
    row = torch.tensor([[1, 2]])
    assert targets.chunk(row, first, 3) is row  # the same classes for every sample
    assert targets.chunk([[1, 2]], first, 3) == [[1, 2]]
    assert targets.chunk(4, first, 3) == 4 and targets.chunk((0, 1), first, 3) == (0, 1)
    scalar = torch.tensor(2)
    assert targets.chunk(scalar, first, 3) is scalar


def test_the_explained_tensor_is_the_output_or_its_logits() -> None:
    t = torch.randn(2, 3)
    assert targets.logits(t) is t
    assert targets.logits({"logits": t}) is t
    assert targets.logits(type("Out", (), {"logits": t})()) is t
    with pytest.raises(RelpropError, match="returned tuple, not a tensor"):
        targets.logits((t, t))
    with pytest.raises(RelpropError, match=r"shape \(3, 2\); expected the batch size 2"):
        targets.flat(t.T, 2)
    assert targets.flat(torch.randn(2, 3, 4), 2).shape == (2, 12)


@pytest.mark.parametrize(("given", "message"), [
    (torch.tensor([1.0, 2.0, 3.0]), "tensor of dtype torch.float32; give class indices"),
    (True, "target is a bool"),
    ([], r"target=\[\] is empty"),
    ([1, 2], "target has 2 entries but the batch has 3 samples"),
    (7, "target 7 is out of range: the model has 5 outputs"),
    ([[1, -1], [0, 0], [0, 0]], "target -1 is out of range"),
    ([[1], [1, 2], [0]], "a nested list must be rectangular"),
    (torch.zeros(1, 1, 1, dtype=torch.long), r"shape \(1, 1, 1\); expected \(\), \(B,\)"),
    (torch.zeros(2, 2, dtype=torch.long), r"shape \(2, 2\); expected \(3, K\) or \(1, K\)"),
    ("cat", "target='cat': give None"),
    ((1, 2), r"a tuple indexes one output position and needs 1 ints"),
    ((9,), r"target \(9,\) is out of range for an output of shape \(B, 5\)"),
])
def test_a_bad_target_raises_a_target_error_naming_the_problem(output, given, message):
    with pytest.raises(TargetError, match=message):
        targets.resolve(given, output)


def test_bad_starts_and_seeds_raise_naming_the_problem(output) -> None:
    with pytest.raises(TargetError, match="either target= or output_relevance="):
        targets.resolve(1, output, torch.ones(B, N))
    index = torch.full((B, 1), -1)
    with pytest.raises(TargetError, match=r"shape \(3, 4\); expected the output's"):
        targets.seeds(output, index, "value", torch.ones(B, 4))
    with pytest.raises(TargetError, match="on an output whose value is 0"):
        targets.seeds(output, index, "value", torch.ones(B, N))  # output[2, 0] == 0
    with pytest.raises(RelpropError, match="start='logit': choose one of value, one"):
        targets.seeds(output, torch.zeros(B, 1, dtype=torch.long), "logit")
    with pytest.raises(TargetError, match=r"position=1: the output has shape \(3, 5\)"):
        targets.at_position(1, output, 1)
    with pytest.raises(TargetError, match="position=4 is out of range for a sequence of 4"):
        targets.at_position(1, torch.randn(2, 4, 6), 4)


def test_a_0d_tensor_target_is_explained_in_chunks_like_an_int() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = torch.randn(5, 4)
    whole = relprop.explain(model, x, 2, composite="epsilon")
    chunked = relprop.explain(model, x, torch.tensor(2), composite="epsilon", batch_size=2)
    assert torch.equal(chunked.target, whole.target)
    torch.testing.assert_close(chunked.relevance, whole.relevance)


def test_a_non_finite_output_is_refused_not_explained() -> None:
    """A model that computes NaN for one sample (as Hugging Face's eager LLaMA does in
    float64 with left padding) gets an error naming the sample, not a NaN heatmap."""

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.tensor([[1.0], [float("nan")]], dtype=x.dtype)

    with pytest.raises(TargetError, match=r"nan \(sample 1, target 0\)"):
        relprop.Explainer(Broken(), "epsilon")(torch.randn(2, 3), target=0)
