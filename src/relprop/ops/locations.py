"""Where a graph node sits, for error messages: its module path, its label and the
innermost frame of the user's own code that created it. Every pass and the
interpreter name an op the same way through these functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx


def node_path(node: fx.Node) -> str:
    """The module path a node belongs to, from the tracer's module stack."""
    if "relprop_path" in node.meta:
        return node.meta["relprop_path"]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) \
            else list(stack.keys())[-1]
    return ""


def node_location(node: fx.Node) -> str:
    """'op X (graph node N) in module Y (file:line: code)' for error messages."""
    label = node.meta.get("relprop_label") or _target_name(node)
    path = node_path(node)
    where = f" in module '{path}'" if path else " in the model's forward"
    frame = user_frame(node.stack_trace or "")
    return f"'{label}' (graph node '{node.name}'){where}" + (f" ({frame})" if frame else "")


_PACKAGE = str(Path(__file__).resolve().parent.parent)  # relprop's own frames are not the user's


def user_frame(stack_trace: str) -> str:
    """The innermost frame of a traced stack that is the user's code, not torch's."""
    lines = stack_trace.strip().splitlines()
    frames = []
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((line, code))
    for line, code in reversed(frames):
        if "/torch/" not in line and "\\torch\\" not in line and _PACKAGE not in line:
            parts = line.split('"')
            file = parts[1] if len(parts) > 2 else line
            lineno = line.split("line ")[-1].split(",")[0]
            return f"{file}:{lineno}: {code}"
    return ""


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}" if node.op == "call_method" else t
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", repr(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod == "_operator":
        return f"operator.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


def original_label(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t._opname}"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}".lstrip(".") \
        .replace("torch.nn.functional.", "F.").replace("_operator.", "operator.")
