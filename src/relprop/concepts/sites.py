"""Where a concept lives: a layer name (module path or graph node name) as a step of the
program, and the axis of its features.

Names are those the user knows: `features.28`, `layer3.1.conv2`, a BatchNorm folded into
its convolution (`layer1.0.bn1`), a container (`layer3.1`: its last operation's output),
or the node names the ledger shows (`features_28`, `add_3`). `PATH:input` is the first
input of that operation: the MLP neurons of a transformer block are the input of its
`down_proj`, the attention heads the input of its `o_proj`.
"""

from __future__ import annotations

import dataclasses
import difflib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from ..errors import RelpropError
from ..ops import Kind, node_args, spec
from ..program import Program
from ..program.fusion import passthrough


class ConceptError(RelpropError, ValueError):
    """A condition names no layer of the model, or concepts the layer does not have."""


@dataclass(frozen=True)
class Site:
    """A named place in the program: `step` is its index, `axis` its feature axis (None:
    from the value's shape when it is known)."""

    key: str
    step: int
    name: str
    path: str
    axis: int | None


def resolve(program: Program, key: str) -> Site:
    """The step a layer name means (see the module docstring)."""
    base, _, port = key.partition(":")
    if port not in ("", "input"):
        raise ConceptError(f"{key!r}: the only suffix is ':input' (the layer's first input)")
    index = _step_of(program, base.strip())
    if port == "input":
        node = program.steps[index].node
        args = [a for a in node_args(node) if program.steps[_index(program, a)].dynamic]
        if not args:
            raise ConceptError(f"{key!r}: {node.name} reads no input that carries relevance")
        layer_axis = _layer_axis(program, index)
        index = _index(program, args[0])
        axis = layer_axis
    else:
        axis = _axis(program, index)
    step = program.steps[index]
    s = spec(step.node)
    return Site(key, index, step.name, s.path if s is not None else "", axis)


def _index(program: Program, node: object) -> int:
    for i, s in enumerate(program.steps):
        if s.node is node:
            return i
    raise ConceptError(f"graph node {node} is not a step of the program")


def _step_of(program: Program, name: str) -> int:
    steps = program.steps
    usable = [i for i, s in enumerate(steps) if s.dynamic and s.op not in ("output",)
              and s.kind is not Kind.META]
    for i in usable:  # a graph node's name, as the ledger shows it
        if steps[i].name == name:
            return i
    exact = [i for i in usable if _paths(steps[i]) and name in _paths(steps[i])]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(steps[i].name for i in exact)
        raise ConceptError(f"{name!r} runs {len(exact)} times ({names}); name one of these "
                           "graph nodes instead")
    inner = [i for i in usable if any(p.startswith(name + ".") for p in _paths(steps[i]))]
    if name and inner:  # a container: its output is its last operation's
        return inner[-1]
    known = sorted({p for i in usable for p in _paths(steps[i])} |
                   {steps[i].name for i in usable})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConceptError(f"no layer {name!r} in the model{hint} (module paths and the ledger's "
                       "node names work)")


def _paths(step) -> tuple[str, ...]:
    s = spec(step.node)
    if s is None:
        return ()
    return (s.path, s.folded) if s.folded else (s.path,)


def _layer_axis(program: Program, index: int) -> int | None:
    s = spec(program.steps[index].node)
    if s is None or s.kind is not Kind.LAYER or s.kernel is None:
        return None
    return -1 if s.kernel.kind == "linear" else 1


def _axis(program: Program, index: int) -> int | None:
    """A layer's own axis, or that of the layer an activation (or a chain of them) follows."""
    for _ in range(6):
        s = spec(program.steps[index].node)
        if s is None:
            return None
        if s.kind is Kind.LAYER:
            return _layer_axis(program, index)
        if s.kind is Kind.BATCHNORM:
            return 1
        if s.kind not in (Kind.GRADIENT, Kind.ELEMENTWISE, Kind.PROPORTIONAL, Kind.SOFTMAX):
            return None
        args = [a for a in node_args(program.steps[index].node)
                if program.steps[_index(program, a)].dynamic]
        if not args:
            return None
        index = _index(program, args[0])
    return None


def feature_axis(site: Site, value: Tensor) -> int:
    """The site's feature axis as a non-negative index of `value`: a convolution's channels
    (1), a dense layer's outputs (last); otherwise 1 for (B, C, H, W)-like values and the
    last axis for (B, D) and (B, T, D) ones."""
    axis = site.axis
    if axis is None:
        axis = 1 if value.dim() >= 4 else -1
    axis = axis % value.dim()
    if axis == 0:
        raise ConceptError(f"{site.key!r}: its value has shape {tuple(value.shape)}; concepts "
                           "need a feature axis beside the batch")
    return axis


def bypassed(program: Program, step: int) -> bool:
    """Whether some path from an explained input to the output avoids `step` (a residual
    skip around it): then relevance reaches the input beside the concept."""
    steps = program.steps
    index = {s.node: i for i, s in enumerate(steps)}
    starts = list(program.placeholders) + list(program.sources)
    seen, todo = set(), [i for i in starts if i != step]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        if steps[i].op == "output":
            return True
        for user in steps[i].node.users:
            j = index[user]
            if j != step and (steps[j].dynamic or steps[j].op == "output"):
                todo.append(j)
    return False


_UNFUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unfused(program: Program, steps: Iterable[int]) -> Program:
    """The program with the named steps computed on their own: a layer fused with the
    activation after it (rules.base.FusedLayer) computes the activation's output, so its
    value would not be the layer's. Its fast path and its activation's pass-through are left out
    (the results are the same; only these steps run unfused). Kept per program."""
    fused = sorted(i for i in set(steps) if program.steps[i].fast is not None)
    if not fused:
        return program
    cache = _UNFUSED.setdefault(program, {})
    key = tuple(fused)
    if key not in cache:
        index = {s.node: i for i, s in enumerate(program.steps)}
        # the activation a layer (or a sum) was fused with passes its input through
        clear = set(fused) | {index[u] for i in fused for u in program.steps[i].node.users
                              if program.steps[index[u]].fast is passthrough}
        new = [dataclasses.replace(s, fast=None) if i in clear else s
               for i, s in enumerate(program.steps)]
        cache[key] = Program(new, program.traced, program.composite)
    return cache[key]
