"""User extensions: rules for your own functions and modules, and leaf submodules.

A function or module relprop does not know gets one of the rule families:

- "identity": element-wise map y = f(x) (same shape): relevance passes unchanged,
  R_x = R_y (the rule relprop uses for GELU, SiLU, tanh, ...).
- "gradient": relevance follows the gradient (R_x = x * dR/dx in gradient form):
  right for maps that only move, copy or scale values, for ReLU-like maps, and
  it is LRP-0 for linear maps.
- "proportional": a linear sum-like map (z = sum of parts): relevance is split
  in proportion to the parts, with the composite's stabilizer.

Example::

    @torch.fx.wrap                   # keep fx from tracing into the function
    def scaled_tanh(x):
        return 1.7 * torch.tanh(x)

    relprop.register_function(scaled_tanh, "identity")
    relprop.register_module(MyActivation, "identity")   # module type: never traced into
    relprop.Explainer(model, leaves={"encoder.block3": "gradient"})  # one submodule

Hugging Face's activation modules (`transformers.activations`: NewGELU,
QuickGELU, ...) are identity leaves without registration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import CompositeError

FAMILIES = ("identity", "gradient", "proportional")

_FUNCTIONS: dict[Any, str] = {}
_MODULES: dict[type, str] = {}


def _check(family: str) -> str:
    if family not in FAMILIES:
        raise CompositeError(f"rule family {family!r}: choose one of {', '.join(FAMILIES)}")
    return family


def register_function(fn: Callable[..., Any], family: str) -> None:
    """Give a function (a leaf for torch.fx, e.g. via torch.fx.wrap) a rule family."""
    _FUNCTIONS[fn] = _check(family)


def register_module(module_type: type[nn.Module], family: str) -> None:
    """Treat every module of this type as one operation with the given rule family."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise CompositeError(f"register_module needs an nn.Module subclass, got {module_type!r}")
    _MODULES[module_type] = _check(family)


def function_family(fn: Any) -> str | None:
    return _FUNCTIONS.get(fn)


def module_family(module: nn.Module, path: str, leaves: dict[str, str]) -> str | None:
    """The family of a module treated as a leaf, by path (exact) or registered type."""
    if path in leaves:
        return _check(leaves[path])
    for cls in type(module).__mro__:
        if cls in _MODULES:
            return _MODULES[cls]
    if type(module).__module__ == "transformers.activations":
        return "identity"  # Hugging Face's activation modules (NewGELU, QuickGELU, ...)
    return None
