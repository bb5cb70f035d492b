"""Turn a user's model into a torch.fx graph, without touching the model.

torch.fx's symbolic tracer is tried first: it needs no example input and keeps
module paths. Models with data-dependent Python control flow cannot be traced
symbolically; for those, `torch.export` is tried with an example input. Both
produce a `torch.fx.Graph` whose nodes the rest of relprop reads.

Both tracers patch process-wide state while they run (fx: `nn.Module.__call__`,
`nn.Module.__getattr__`, `math` functions and `@torch.fx.wrap` functions in
module globals; export: the same through make_fx, plus `builtins.max/min` and
`math.pow`). Two traces at once corrupt each other and can leave the patches in
place for good, so every trace holds `TRACE_LOCK`. Other threads still see an
fx trace's patches; relprop's tracer answers their calls as if unpatched (see
`_Tracer`), so plain torch code and relprop programs elsewhere are unaffected.
torch.export's patches cannot be answered that way, and it also switches
mkldnn/nnpack/cudnn off process-wide while it traces: relprop's own
explanations hold the lock's shared side, so none runs during a trace; plain
torch code in other threads during an export fallback does see that
(convolutions may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .errors import TraceError
from .registry import module_family


class _TraceLock:
    """Traces exclusive (their patches are global), explanations shared.

    `with TRACE_LOCK:` traces (re-entrant in one thread); `with TRACE_LOCK.shared():`
    explains: it waits for a trace in progress to finish, and a trace waits for the
    explanations running to finish, so no explanation ever runs under a trace's
    patches (torch.export's cannot be hidden from other threads). Readers go first:
    nested explanations in one thread never wait on a queued trace.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._readers = 0

    def __enter__(self) -> None:
        self._cond.acquire()
        while self._readers:
            self._cond.wait()

    def __exit__(self, *exc: object) -> None:
        self._cond.release()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()


TRACE_LOCK = _TraceLock()


class _Tracer(fx.Tracer):
    """The stock tracer, with code locations recorded and user-chosen leaf modules.

    While it traces, fx routes every thread's module calls and module attribute
    reads through it (the patches are class attributes). Calls from threads other
    than the tracing one are answered as the unpatched torch would answer them and
    never touch this trace's graph or patcher.
    """

    def __init__(self, leaves: dict[str, str]) -> None:
        self._owner: int | None = threading.get_ident()  # the thread that builds and traces
        super().__init__()
        self.record_stack_traces = True
        self.leaves = leaves

    @property
    def _autowrap_function_ids(self) -> set[int]:  # type: ignore[override]
        # fx's patched __call__ autowraps math functions in the caller's module globals
        # on this trace's patcher: from another thread that could outlive the trace.
        return self._wrap_ids if self._tracing_here() else set()

    @_autowrap_function_ids.setter
    def _autowrap_function_ids(self, ids: set[int]) -> None:
        self._wrap_ids = ids

    def _tracing_here(self) -> bool:
        return self._owner == threading.get_ident()

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # Visit the globals of every submodule's forward up front: a visit from another
        # thread (which wraps nothing, see above) would otherwise mark them as done.
        base = self._autowrap_search
        self._autowrap_search = [*base, *_forward_modules(root)]
        self._owner = threading.get_ident()
        try:
            return super().trace(root, concrete_args)
        finally:
            self._owner = None
            self._autowrap_search = base

    def call_module(self, m: nn.Module, forward, args, kwargs):  # noqa: ANN001, ANN201
        if not self._tracing_here():
            return forward(*args, **kwargs)  # the original Module.__call__
        # Trace through m.forward, not m.__call__: the user's hooks must not fire
        # (they would see Proxies, and relprop promises to leave hooks alone).
        return super().call_module(m, lambda *a, **k: m.forward(*a, **k), args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if not self._tracing_here():
            return attr_val  # another thread reads a parameter: the tensor, not a Proxy
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_family(m, module_qualified_name, self.leaves) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _forward_modules(root: Any) -> list[ModuleType]:
    """Python modules whose globals hold the forward of some module in root's tree."""
    if not isinstance(root, nn.Module):
        return []
    found: dict[int, ModuleType] = {}
    for m in root.modules():
        fn = inspect.unwrap(type(m).forward)
        mod = sys.modules.get(getattr(fn, "__module__", None) or "")
        if mod is not None and getattr(fn, "__globals__", None) is mod.__dict__:
            found.setdefault(id(mod), mod)
    return list(found.values())


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
    # forward parameters fed as constants at every call (attention masks, lengths):
    # placeholders whose values are not explained; placeholder name -> parameter name
    constants: dict[str, str] = field(default_factory=dict)
    # placeholders holding token ids: explained at their embedding lookups' outputs
    index_inputs: frozenset[str] = frozenset()
    # keyword values explaining fixes (use_cache=False), fed like `constants`
    fixed: dict[str, Any] = field(default_factory=dict)
    # the user's model (torch.export's root is a new module without the original classes)
    model: nn.Module | None = None


def trace_fx(model: nn.Module, leaves: dict[str, str] | None = None,
             inputs: int = 1, keywords: frozenset[str] = frozenset()) -> TracedModel:
    """Trace symbolically; raises TraceError with the tracer's reason on failure.

    `inputs` positional arguments become graph inputs. Parameters past them that
    have a default are traced with that default, as the model runs when they are
    left out (`if mask is not None:` takes the default branch), except the
    `keywords` the caller feeds as constants: those stay graph inputs.
    """
    check_keywords(model, inputs, keywords)
    concrete = {k: v for k, v in _defaults(model, inputs).items() if k not in keywords}
    concrete.update(_explaining_defaults(model, inputs, {k: None for k in keywords}))
    tracer = _Tracer(leaves or {})
    try:
        with TRACE_LOCK, preserved(model, eval_mode=True):
            graph = tracer.trace(model, concrete_args=concrete or None)
        _drop_specialised(graph, model, concrete)
        _drop_unused_varargs(graph)
    except Exception as exc:  # fx raises many kinds of errors for untraceable code
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    constants = {n.name: str(n.target) for n in graph.nodes
                 if n.op == "placeholder" and str(n.target) in keywords}
    return TracedModel(graph=graph, root=model, method="fx", leaves=leaves or {},
                       constants=constants)


def check_keywords(model: nn.Module, inputs: int, keywords: frozenset[str]) -> None:
    """Keyword inputs must name forward parameters not already given positionally."""
    params = _parameters(model)
    if not keywords or any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind is not p.VAR_POSITIONAL]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                       p.POSITIONAL_OR_KEYWORD)][:inputs]
    for k in sorted(keywords):
        if k not in names:
            raise TraceError(f"forward_kwargs: {type(model).__name__}.forward has no parameter "
                             f"{k!r}; its parameters are {', '.join(names)}")
        if k in positional:
            raise TraceError(f"forward_kwargs: {k!r} is already given as input "
                             f"{positional.index(k)} (explained inputs come first, "
                             "constant keywords after)")


_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, torch.dtype, torch.device,
                   torch.layout, torch.memory_format)


def _parameters(model: nn.Module) -> list[inspect.Parameter]:
    """forward's parameters without `self`, as fx sees them (decorators unwrapped)."""
    try:
        sig = inspect.signature(inspect.unwrap(type(model).forward))
    except (TypeError, ValueError):
        return []
    return list(sig.parameters.values())[1:]


def _defaults(model: nn.Module, inputs: int) -> dict[str, Any]:
    """fx concrete_args: parameters with a plain-value default not among the first `inputs`.

    Tensor (or other object) defaults stay graph inputs: as a constant, fx would store a
    tensor on the user's model.
    """
    out: dict[str, Any] = {}
    position = 0
    for p in _parameters(model):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            position += 1
            if position <= inputs:
                continue
        elif p.kind is not p.KEYWORD_ONLY:
            continue  # *args, **kwargs
        if p.default is not p.empty and _plain(p.default):
            out[p.name] = p.default
    return out


def _plain(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return isinstance(value, _CONSTANT_TYPES)


def _drop_unused_varargs(graph: fx.Graph) -> None:
    """`forward(x, **kwargs)` gives a `**kwargs` placeholder; unused, it is no input."""
    for node in list(graph.nodes):
        if node.op == "placeholder" and str(node.target).startswith("*") and not node.users:
            graph.erase_node(node)


def _drop_specialised(graph: fx.Graph, model: nn.Module, concrete: dict[str, Any]) -> None:
    """Remove what fx records for concrete_args: a placeholder per value and its asserts.

    relprop feeds placeholders from the inputs given and has no rule for the
    `_assert_is_none` / `eq` + `_assert` checks; the graph never uses the values.
    """
    if not concrete:
        return
    inputs = {p.name for p in _parameters(model) if p.name not in concrete}
    start = [n for n in graph.nodes if n.op == "placeholder"
             and str(n.target).lstrip("*") not in inputs]
    doomed: set[fx.Node] = set()
    while start:
        node = start.pop()
        if node not in doomed:
            doomed.add(node)
            start.extend(node.users)
    if any(n.op == "output" for n in doomed):
        raise RuntimeError("the output depends on a specialised default argument")
    for node in reversed(list(graph.nodes)):
        if node in doomed:
            graph.erase_node(node)
    codegen = graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen):
        # A tuple/list default makes fx flatten the signature and the output into lists;
        # give the output node the model's own structure back (relprop reads it).
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        out.args = (pytree.tree_unflatten(list(out.args[0]), codegen.pytree_info.out_spec),)
        graph.set_codegen(fx.graph.CodeGen())


@contextlib.contextmanager
def preserved(model: nn.Module, eval_mode: bool = False) -> Iterator[None]:
    """Guarantee the model leaves as it came: train/eval flags and requires_grad restored.

    eval_mode=True: every module in eval mode meanwhile. Tracing needs it (inference
    semantics: Python `if self.training:` branches, stochastic depth and dropout
    are resolved while tracing, so the graph must be recorded in eval mode), and so
    does relprop.evaluate, which runs the model itself. The one eval-mode restorer:
    explanations, traces and faithfulness checks all use it.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            for m, _ in modes:  # the flag itself: an exported module refuses .eval()
                m.training = False
        yield
    finally:
        for m, mode in modes:
            if m.training != mode:
                m.training = mode
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def trace_export(model: nn.Module, example: tuple[torch.Tensor, ...],
                 keywords: dict[str, Any] | None = None) -> TracedModel:
    """Trace with torch.export on an example input (for data-dependent Python code).

    `keywords` are fed as constants at every call; the graph specialises on them
    where the code branches on them. Sizes are left free where the code allows (the
    batch, sequence lengths); the program serves the sizes it did not fix and its
    guards admit (`serves`), and at least this example's: export specialises sizes 0
    and 1, so a batch of one is traced as two first, then as itself, then with every
    size fixed."""
    keywords = keywords or {}
    check_keywords(model, len(example), frozenset(keywords))
    fixed = _explaining_defaults(model, len(example), keywords)
    kwargs = {**keywords, **fixed}
    doubled, kw2 = _doubled(example), _doubled(kwargs, len(example[0]))
    tries = [(doubled, kw2, True), (example, kwargs, True), (example, kwargs, False)]
    if doubled is example:
        del tries[0]
    try:
        with TRACE_LOCK, preserved(model, eval_mode=True):
            for i, (args, kw, free) in enumerate(tries):
                try:
                    exported = torch.export.export(
                        model, args, kwargs=kw, strict=False,
                        dynamic_shapes=_free_sizes(args, kw) if free else None)
                except Exception:  # sizes the code specialises on: the next try fixes more
                    if i == len(tries) - 1:
                        raise
                    continue
                traced = _traced(exported, model, example, keywords, fixed)
                # the doubled batch fixed at 2, or a guard the doubled sizes pass and this
                # input's fail (SigLIP's `N % (B * N) != 0` at a batch of one)
                if i == len(tries) - 1 or serves(traced, example, keywords):
                    return traced
    except Exception as exc:
        raise TraceError(
            f"neither torch.fx nor torch.export could trace {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError("unreachable: the last try returns or raises")


def _traced(exported: Any, model: nn.Module, example: tuple[torch.Tensor, ...],
            keywords: dict[str, Any], fixed: dict[str, Any]) -> TracedModel:
    """The TracedModel of an ExportedProgram: its placeholders past the explained inputs
    are the keywords', then the explaining fixes'."""
    module = exported.module()
    holders = [n for n in module.graph.nodes if n.op == "placeholder"]
    constants = {n.name: k for n, k in zip(holders[len(example):], [*keywords, *fixed],
                                           strict=False)}
    return TracedModel(graph=module.graph, root=module, method="export", constants=constants,
                       model=model, fixed=fixed)


def _placeholder_values(traced: TracedModel, inputs: tuple[Any, ...],
                        keywords: dict[str, Any] | None) -> dict[str, Any]:
    """Placeholder name -> the value a run feeds it: the inputs in order, the constants
    by parameter name (as Program.run feeds them)."""
    values: dict[str, Any] = {}
    feed = iter(inputs)
    for node in traced.graph.find_nodes(op="placeholder"):
        name = traced.constants.get(node.name)
        values[node.name] = next(feed, None) if name is None else \
            (keywords or {}).get(name, traced.fixed.get(name))
    return values


def sizes(traced: TracedModel) -> tuple[tuple[str, tuple[int | None, ...]], ...] | None:
    """The sizes an export trace serves, per tensor placeholder: an int where export
    fixed the size (a loop over the tokens, a size of one, an image's size), None where
    it left it free; None for an fx trace (every size)."""
    if traced.method != "export":
        return None
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    out = []
    for node in traced.graph.find_nodes(op="placeholder"):  # indexed: runs every call
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.append((node.name, tuple(int(d) if is_concrete_int(d) else None
                                         for d in val.shape)))
    return tuple(out)


def serves(traced: TracedModel, inputs: tuple[Any, ...],
           keywords: dict[str, Any] | None = None) -> bool:
    """Whether a trace serves these inputs: an fx trace every size; an export trace the
    sizes it fixed (`sizes`), any size it left free, where its guards hold.

    The guards are torch.export's `_guards_fn`, which the program runs first: a trace
    with free sizes holds for the sizes its guards admit, not for every size (SigLIP's
    attention-pooling head guards `N % (B * N) != 0` for N patches, which a batch of
    one fails)."""
    if traced.method != "export":
        return True
    values = _placeholder_values(traced, inputs, keywords)
    for name, dims in sizes(traced) or ():
        value = values.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() != len(dims) or any(
                d is not None and d != n for d, n in zip(dims, value.shape, strict=True)):
            return False
    guard = next(iter(traced.graph.find_nodes(op="call_module", target="_guards_fn")), None)
    if guard is None:
        return True
    try:
        attribute(traced.root, "_guards_fn")(
            *fx.node.map_arg(guard.args, lambda n: values.get(n.name)))
    except AssertionError:
        return False
    return True


def _doubled(values: Any, batch: int | None = None) -> Any:
    """A batch of one repeated twice (tensors whose first size is 1), else unchanged."""
    if isinstance(values, dict):
        if batch != 1:
            return values
        return {k: _doubled(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    if isinstance(values, tuple):
        if not values or not isinstance(values[0], torch.Tensor) or values[0].dim() == 0 \
                or values[0].shape[0] != 1:
            return values
        return tuple(_doubled(v) for v in values)
    if isinstance(values, torch.Tensor) and values.dim() and values.shape[0] == 1:
        return torch.cat([values, values])
    return values


def _free_sizes(example: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """torch.export's dynamic_shapes: Dim.AUTO for the batch size of every tensor and for
    every size of token ids and keyword tensors (sequence lengths, masks); the other
    sizes of floating-point inputs (an image's) stay fixed: freeing them all makes
    exporting a Swin Transformer 20 times slower (`sizes` reads what a trace fixed).
    Sizes 0 and 1 stay fixed: export would fix them anyway (and warn)."""
    def free(v: Any, every: bool) -> Any:
        if isinstance(v, torch.Tensor):
            dims = range(v.dim()) if every or not v.is_floating_point() else range(min(
                v.dim(), 1))
            return {d: torch.export.Dim.AUTO for d in dims if v.shape[d] > 1}
        return None

    return (*(free(v, False) for v in example), *(free(v, True) for v in kwargs.values()))


def _explaining_defaults(model: nn.Module, inputs: int,
                         keywords: dict[str, Any]) -> dict[str, Any]:
    """Arguments explaining fixes where the forward has them: no key-value cache
    (`use_cache=False`; a cache object is no output to explain)."""
    names = {p.name for p in _parameters(model)[inputs:]}
    return {"use_cache": False} if "use_cache" in names and "use_cache" not in keywords \
        else {}


def attribute(root: nn.Module, target: str) -> torch.Tensor:
    """Fetch a dotted attribute (a parameter or buffer) from a module tree.

    Reads modules' parameter/buffer/child tables directly rather than through
    `nn.Module.__getattr__`, which a trace in another thread may have patched.
    """
    obj: Any = root
    for part in target.split("."):
        tables = (obj.__dict__.get(t) for t in ("_parameters", "_buffers", "_modules")) \
            if isinstance(obj, nn.Module) else ()
        table = next((t for t in tables if t is not None and part in t), None)
        obj = table[part] if table is not None else getattr(obj, part)
    return obj
