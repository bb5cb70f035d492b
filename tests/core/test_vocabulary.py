"""The op vocabulary (relprop.ops.vocabulary): one entry per op, every spelling of it
(torch function, operator, Tensor method, ATen overload from torch.export) answers
with the same entry, and nothing outside relprop.ops compares `node.target` with a set
of functions."""

from __future__ import annotations

import ast
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from relprop.ops import is_op, lookup, meaning
from relprop.ops.vocabulary import _ENTRIES

SRC = Path(__file__).resolve().parents[2] / "src" / "relprop"


def _fx_and_export_ops(fn, x) -> tuple[list[str], list[str]]:
    """The vocabulary names of the call nodes of fn traced by fx and by torch.export."""

    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    names = []
    for graph in (fx.symbolic_trace(M()).graph,
                  torch.export.export(M(), (x,)).graph_module.graph):
        names.append([meaning(n).name if meaning(n) is not None else str(n.target)
                      for n in graph.nodes if n.op in ("call_function", "call_method")])
    return names[0], names[1]


@pytest.mark.parametrize("fn, name", [
    (torch.relu, "relu"), (F.relu, "relu"), (lambda x: x.relu(), "relu"),
    (F.leaky_relu, "leaky_relu"), (torch.sigmoid, "sigmoid"), (lambda x: x.sigmoid(), "sigmoid"),
    (F.silu, "silu"), (lambda x: F.max_pool2d(x, 2), "max_pool2d"),
    (lambda x: x + x, "add"), (lambda x: torch.add(x, x), "add"), (lambda x: x.add(x), "add"),
    (lambda x: x / 2, "div"), (lambda x: x * 2, "mul"), (lambda x: x.flatten(1), "flatten"),
    (lambda x: torch.flatten(x, 1), "flatten"), (lambda x: x.mean(1), "mean"),
    (lambda x: F.adaptive_avg_pool2d(x, 1), "adaptive_avg_pool2d"),
])
def test_every_spelling_means_the_same_op(fn, name):
    by_fx, by_export = _fx_and_export_ops(fn, torch.randn(2, 3, 4, 4))
    assert by_fx == [name]
    assert name in by_export, by_export


def test_max_pooling_with_its_argmax_is_a_max_pooling():
    """torch.export may spell max pooling with its argmax: still a max pooling."""
    for op in (torch.ops.aten.max_pool2d_with_indices.default,
               torch.ops.aten.adaptive_max_pool1d.default):
        entry = lookup(op)
        assert entry is not None and entry.pool_dims and entry.returns_indices
    assert lookup(F.max_pool2d).pool_dims == 2 and not lookup(F.max_pool2d).returns_indices


def test_one_entry_per_spelling():
    seen: dict = {}
    for entry in _ENTRIES:
        for key in [("f", f) for f in entry.functions] + [("m", m) for m in entry.methods] + \
                [("a", a) for a in entry.aten]:
            assert seen.setdefault(key, entry.name) == entry.name, key


def test_is_op_on_non_nodes():
    assert not is_op(3, "add") and not is_op(None, "relu")
    assert lookup(operator.add).name == "add" and lookup("add", method=True).name == "add"


def _target_set_comparisons(path: Path) -> list[str]:
    """`<x>.target in {...}` / `<x>.target is <function>` in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        left = node.left
        if not (isinstance(left, ast.Attribute) and left.attr == "target"):
            continue
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn) or (
                    isinstance(op, ast.Is | ast.IsNot) and not (
                        isinstance(right, ast.Constant) and right.value is None)):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_no_module_outside_ops_compares_node_targets_with_sets():
    offenders = [hit for path in SRC.rglob("*.py") if "ops" not in path.relative_to(SRC).parts
                 for hit in _target_set_comparisons(path)]
    assert offenders == []
