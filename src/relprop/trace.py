"""Turn a user's model into a torch.fx graph, without touching the model.

torch.fx's symbolic tracer is tried first: it needs no example input and keeps
module paths. Models with data-dependent Python control flow cannot be traced
symbolically; for those, `torch.export` is tried with an example input. Both
produce a `torch.fx.Graph` whose nodes the rest of relprop reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import TraceError
from .registry import module_family


class _Tracer(fx.Tracer):
    """The stock tracer, with code locations recorded and user-chosen leaf modules."""

    def __init__(self, leaves: dict[str, str]) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.leaves = leaves

    def call_module(self, m: nn.Module, forward, args, kwargs):  # noqa: ANN001, ANN201
        # Trace through m.forward, not m.__call__: the user's hooks must not fire
        # (they would see Proxies, and relprop promises to leave hooks alone).
        return super().call_module(m, lambda *a, **k: m.forward(*a, **k), args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_family(m, module_qualified_name, self.leaves) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class TracedModel:
    """A graph of the model's operations plus the module that owns its attributes.

    `root` is the user's model (fx) or the exported module (export); graph
    attributes (`get_attr` targets) are looked up on it at every call, so the
    explanation always sees the model's current parameters.
    """

    graph: fx.Graph
    root: nn.Module
    method: str  # "fx" or "export"
    leaves: dict[str, str] = field(default_factory=dict)  # module path -> rule family


def trace_fx(model: nn.Module, leaves: dict[str, str] | None = None) -> TracedModel:
    """Trace symbolically; raises TraceError with the tracer's reason on failure."""
    tracer = _Tracer(leaves or {})
    try:
        with _eval_mode(model):
            graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds of errors for untraceable code
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    return TracedModel(graph=graph, root=model, method="fx", leaves=leaves or {})


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Trace with inference semantics (stochastic depth, dropout branches off); restore after.

    Python `if self.training:` branches are resolved while tracing, so the
    graph must be recorded in eval mode; every module's flag is put back.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def trace_export(model: nn.Module, example: tuple[torch.Tensor, ...]) -> TracedModel:
    """Trace with torch.export on an example input (for data-dependent Python code)."""
    try:
        with _eval_mode(model):
            exported = torch.export.export(model, example, strict=False)
        module = exported.module()
    except Exception as exc:
        raise TraceError(
            f"neither torch.fx nor torch.export could trace {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return TracedModel(graph=module.graph, root=module, method="export")


def attribute(root: nn.Module, target: str) -> torch.Tensor:
    """Fetch a dotted attribute (a parameter or buffer) from a module tree."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
