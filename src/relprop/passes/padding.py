"""Every padding spelling (F.pad in each mode, ATen's pad ops from torch.export) as one
F.pad node, and a non-zero constant border split off as a constant summand, so
the catalogue needs one rule for padding.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..ops import is_op, original_label, pad_arguments

_PAD_MODES = {"reflection": "reflect", "replication": "replicate"}


def _aten_pad(node: fx.Node) -> tuple[Any, Any, str, Any] | None:
    """(input, pad, mode, value) of an ATen padding op (graphs from torch.export)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    name = t._opname
    a = list(node.args)
    if name == "pad":
        x, pad, mode, value = (a + [node.kwargs.get("mode", "constant"),
                                    node.kwargs.get("value")])[:4]
        return x, pad, mode, value
    if name == "constant_pad_nd":
        return a[0], a[1], "constant", a[2] if len(a) > 2 else node.kwargs.get("value", 0)
    if name == "_pad_circular":
        return a[0], a[1], "circular", None
    for prefix, mode in _PAD_MODES.items():
        if name.startswith(prefix + "_pad") and not name.endswith("backward"):
            return a[0], a[1], mode, None
    return None


def normalize_padding(graph: fx.Graph) -> None:
    """Every pad as F.pad(x, pad, mode, value); a constant c != 0 split off as a summand.

    Zero/reflect/replicate/circular padding only moves (and copies) values: the
    gradient is the rule, and relevance at copies sums back to their source.
    pad(x, c) with c != 0 equals pad(x, 0) + C, C being c on the border and 0
    inside: a sum with a constant summand, so relevance reaching the border is
    absorbed by C like a bias (the ledger books it as bias).
    """
    for node in list(graph.nodes):
        aten = _aten_pad(node)
        if aten is not None:
            node.meta.setdefault("relprop_label", original_label(node))
            x, pad, mode, value = aten
        elif is_op(node, "pad"):
            x, pad, mode, value = pad_arguments(node)
        else:
            continue
        if mode != "constant":
            value = None
        node.target, node.args, node.kwargs = F.pad, (x, pad, mode, value), {}
        if mode != "constant" or isinstance(value, fx.Node) or not value:
            continue
        node.args = (x, pad, mode, 0.0)
        meta = {k: v for k, v in node.meta.items() if k in (
            "nn_module_stack", "stack_trace", "relprop_path")}
        label = node.meta.get("relprop_label", "F.pad")
        with graph.inserting_after(node):
            zeros = graph.call_function(torch.zeros_like, (x,))
        with graph.inserting_after(zeros):
            border = graph.call_function(F.pad, (zeros, pad, "constant", value))
        with graph.inserting_after(border):
            total = graph.call_function(operator.add, (node, border))
        for new, what in ((zeros, "zeros"), (border, f"border = {value}"),
                          (total, f"+ border {value}")):
            new.meta.update(meta)
            new.meta["relprop_label"] = f"{label} ({what})"
        node.replace_all_uses_with(total, delete_user_cb=lambda u, t=total: u is not t)
