"""THE op vocabulary: one entry per operation, holding every spelling of it and what
it is, and `meaning(node)`, the one lookup that answers alike for torch.fx graphs
(torch functions, operators, Tensor methods) and torch.export graphs (ATen
overloads).

An entry (`Op`) says which rule family the op belongs to (`kind`, see
relprop.ops.spec.Kind; None for ops relprop knows only as shapes, views or held
statistics) and the facts the passes, the planner and the shadow channel need:
whether its output is non-negative, zero below zero, a gate, a pure move, a product,
a quotient (linear in the dividend only), a max pooling (and its with-indices form),
a view (shares storage), a read of sizes alone.

To support a new op, add one entry below with all its spellings. Nothing outside
relprop.ops compares `node.target` with a set of functions: everything asks
`meaning(node)` or `is_op(node, name, ...)`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .spec import Kind


@dataclass(frozen=True)
class Op:
    """One operation, whatever its spelling."""

    name: str
    kind: Kind | None  # rule family; None: known (views, shapes, statistics), no rule
    functions: tuple[Any, ...] = ()  # call_function targets in fx graphs
    methods: tuple[str, ...] = ()  # Tensor method names (fx call_method)
    aten: tuple[str, ...] = ()  # ATen op names (OpOverload._opname, torch.export graphs)
    nonneg: str = "never"  # output >= 0: "always", "preserve" (if its inputs are), "never"
    zero_below: bool = False  # output and gradient are 0 where the input <= 0 (ReLU)
    gate: bool = False  # output in [0, 1]: a gate when it multiplies another activation
    pure_move: bool = False  # one-to-one rearrangement (reshape, permute, ...)
    product: bool = False  # multiplication / division / matmul
    divides: bool = False  # a quotient: linear in its first operand only
    subtracts: bool = False  # x - y (a sum whose output sign is not preserved)
    binary_sum: bool = False  # x + y or x - y
    signed_identity: bool = False  # positively homogeneous, signed (leaky ReLU, PReLU)
    statistic: bool = False  # a normaliser (sqrt, rsqrt, norm, std): held where it scales
    dropout: bool = False  # the identity at inference
    view: bool = False  # the output may share storage with the first argument
    shape_only: bool = False  # reads sizes (or dtype, device), not values
    template: bool = False  # a new tensor whose values depend on its input's shape only
    pool_dims: int = 0  # max pooling over this many spatial dims
    returns_indices: bool = False  # max pooling spelt with its argmax (ATen, export)
    choice: bool = False  # a discrete result (indices, comparisons): no relevance, held
    selects: bool = False  # (values, indices) of chosen entries: values a move, indices a choice


def _op(name: str, kind: Kind | None, *, functions: tuple = (), methods: tuple = (),
        aten: tuple | None = None, **facts: Any) -> Op:
    """An entry; by default its ATen spelling is its name."""
    return Op(name, kind, tuple(functions), tuple(methods),
              tuple((name,) if aten is None else aten), **facts)


def identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    """The identity as a graph function (nn.Identity, dropout at inference)."""
    return x


G, P, E = Kind.GRADIENT, Kind.PROPORTIONAL, Kind.ELEMENTWISE
_MOVE = {"nonneg": "preserve"}
_PURE = {"nonneg": "preserve", "pure_move": True, "view": True}

_ENTRIES: list[Op] = [
    # linear-like layers (their arguments are normalised by relprop.passes.arguments)
    _op("linear", Kind.LAYER, functions=(F.linear,)),
    *(_op(f"conv{d}d", Kind.LAYER, functions=(getattr(F, f"conv{d}d"),)) for d in (1, 2, 3)),
    *(_op(f"conv_transpose{d}d", Kind.LAYER, functions=(getattr(F, f"conv_transpose{d}d"),))
      for d in (1, 2, 3)),
    _op("batch_norm", Kind.BATCHNORM, functions=(F.batch_norm,)),
    _op("lstm_cell", Kind.RECURRENT), _op("gru_cell", Kind.RECURRENT),
    _op("addmm", None, functions=(torch.addmm,)),  # a linear layer when W is a parameter
    # beta * input + alpha * (batch1 @ batch2) (BLOOM's ALiBi scores): decomposed into a
    # sum with a constant summand and a product by relprop.passes.transformer
    _op("baddbmm", None, functions=(torch.baddbmm,), methods=("baddbmm",)),
    # ReLU: its gradient is the identity rule
    _op("relu", G, functions=(F.relu, torch.relu, torch.relu_, F.relu_),
        methods=("relu", "relu_"), aten=("relu", "relu_"), zero_below=True, nonneg="always"),
    _op("leaky_relu", G, functions=(F.leaky_relu,), signed_identity=True),
    _op("prelu", G, functions=(F.prelu,), aten=("prelu", "_prelu_kernel"),
        signed_identity=True),
    # moves: relevance goes with the values
    _op("flatten", G, functions=(torch.flatten,), methods=("flatten",), **_PURE),
    _op("reshape", G, functions=(torch.reshape,), methods=("reshape", "reshape_as"),
        aten=("reshape", "_reshape_alias"), **_PURE),
    _op("view", G, methods=("view", "view_as"), aten=("view", "_unsafe_view", "alias"),
        **_PURE),
    _op("permute", G, functions=(torch.permute,), methods=("permute",), **_PURE),
    _op("transpose", G, functions=(torch.transpose, torch.swapaxes),
        methods=("transpose", "swapaxes"), aten=("transpose", "swapaxes"), **_PURE),
    _op("t", G, functions=(torch.t,), methods=("t",), **_PURE),
    _op("movedim", G, functions=(torch.movedim,), methods=("movedim",), **_PURE),
    _op("squeeze", G, functions=(torch.squeeze,), methods=("squeeze",), **_PURE),
    _op("unsqueeze", G, functions=(torch.unsqueeze,), methods=("unsqueeze",), **_PURE),
    _op("unflatten", G, functions=(torch.unflatten,), methods=("unflatten",), **_PURE),
    _op("clone", G, functions=(torch.clone,), methods=("clone",), aten=("clone",),
        nonneg="preserve", pure_move=True),
    _op("contiguous", G, methods=("contiguous",), aten=("contiguous",), **_PURE),
    _op("identity", G, functions=(identity,), aten=("detach", "lift_fresh_copy"), **_PURE),
    _op("detach_", G, methods=("detach_",), aten=(), **_MOVE),
    _op("cast", G, methods=("float", "double", "half", "to", "type_as"),
        aten=("_to_copy", "to", "type_as"), view=True, **_MOVE),
    _op("cat", G, functions=(torch.cat, torch.concat, torch.concatenate), aten=("cat",),
        **_MOVE),
    _op("stack", G, functions=(torch.stack,), **_MOVE),
    _op("getitem", G, functions=(operator.getitem,), methods=("__getitem__",), aten=(),
        view=True, **_MOVE),
    _op("select", G, functions=(torch.select,), methods=("select",), view=True, **_MOVE),
    _op("slice", G, view=True, **_MOVE),
    _op("split", G, functions=(torch.split,), methods=("split",),
        aten=("split", "split_with_sizes"), view=True, **_MOVE),
    _op("chunk", G, functions=(torch.chunk,), methods=("chunk",), view=True, **_MOVE),
    _op("unbind", G, functions=(torch.unbind,), methods=("unbind",), view=True, **_MOVE),
    _op("narrow", G, functions=(torch.narrow,), methods=("narrow",), view=True, **_MOVE),
    _op("expand", G, methods=("expand", "expand_as"), view=True, **_MOVE),
    _op("repeat", G, methods=("repeat",), **_MOVE),
    _op("repeat_interleave", G, functions=(torch.repeat_interleave,),
        methods=("repeat_interleave",), **_MOVE),
    _op("flip", G, functions=(torch.flip,), methods=("flip",), **_MOVE),
    _op("roll", G, functions=(torch.roll,), **_MOVE),
    _op("pad", G, functions=(F.pad,), aten=("pad", "constant_pad_nd"), **_MOVE),
    # gathers: relevance goes back to the gathered positions (CLIP's pooling at the
    # end-of-sequence token, DeBERTa's relative positions); a copy's relevance sums back
    _op("gather", G, functions=(torch.gather, torch.take_along_dim),
        methods=("gather", "take_along_dim"), aten=("gather", "take_along_dim"), **_MOVE),
    _op("index", G, aten=("index",), **_MOVE),  # x[idx] with index tensors (export)
    # a write of src into a slice of x (an in-place write through a view, functionalized:
    # mambapy's parallel scan): the slice's relevance goes back to src, the rest to x
    _op("slice_scatter", G, functions=(torch.select_scatter, torch.slice_scatter),
        aten=("select_scatter", "slice_scatter"), **_MOVE),
    _op("index_select", G, functions=(torch.index_select,), methods=("index_select",),
        **_MOVE),
    # where(mask, value, x): relevance moves with the kept entries; the filled ones hold none
    _op("masked_fill", G, functions=(torch.masked_fill,), methods=("masked_fill",)),
    # the k largest (smallest, sorted) entries and their positions: the values move as in
    # max pooling, the positions are a constant choice (relprop.passes.routing); a router's
    # choice over a softmax is held whole (its routing weights constant)
    _op("topk", G, functions=(torch.topk,), methods=("topk",), selects=True, **_MOVE),
    _op("sort", G, functions=(torch.sort,), methods=("sort",), selects=True, **_MOVE),
    *(_op(f"max_pool{d}d", G, functions=(getattr(F, f"max_pool{d}d"),), pool_dims=d, **_MOVE)
      for d in (1, 2, 3)),
    *(_op(f"max_pool{d}d_with_indices", G, pool_dims=d, returns_indices=True, **_MOVE)
      for d in (1, 2, 3)),
    *(_op(f"adaptive_max_pool{d}d", G, functions=(getattr(F, f"adaptive_max_pool{d}d"),),
          aten=(), pool_dims=d, **_MOVE) for d in (1, 2, 3)),
    *(_op(f"adaptive_max_pool{d}d_with_indices", G, aten=(f"adaptive_max_pool{d}d",),
          pool_dims=d, returns_indices=True, **_MOVE) for d in (1, 2, 3)),
    _op("dropout", G, functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                 F.alpha_dropout, F.feature_alpha_dropout, torch.dropout,
                                 torch.alpha_dropout, torch.feature_dropout,
                                 torch.feature_alpha_dropout),
        aten=("dropout",), dropout=True, nonneg="preserve", pure_move=True),
    # sums: proportional split
    _op("add", P, functions=(operator.add, torch.add, operator.iadd),
        methods=("add", "add_", "__add__"), nonneg="preserve", binary_sum=True),
    _op("sub", P, functions=(operator.sub, torch.sub, operator.isub),
        methods=("sub", "sub_", "__sub__"), subtracts=True, binary_sum=True),
    _op("sum", P, functions=(torch.sum,), methods=("sum",), nonneg="preserve"),
    # running sums (Mamba2's segment sums of A Delta): each output a sum of inputs
    _op("cumsum", P, functions=(torch.cumsum,), methods=("cumsum",), nonneg="preserve"),
    _op("mean", P, functions=(torch.mean,), methods=("mean",), nonneg="preserve"),
    *(_op(f"avg_pool{d}d", P, functions=(getattr(F, f"avg_pool{d}d"),), nonneg="preserve")
      for d in (1, 2, 3)),
    *(_op(f"adaptive_avg_pool{d}d", P, functions=(getattr(F, f"adaptive_avg_pool{d}d"),),
          nonneg="preserve") for d in (1, 2, 3)),
    # element-wise non-linearities: identity rule
    _op("sigmoid", E, functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid", "sigmoid_"),
        nonneg="always", gate=True),
    _op("hardsigmoid", E, functions=(F.hardsigmoid,), nonneg="always", gate=True),
    _op("tanh", E, functions=(torch.tanh, F.tanh), methods=("tanh", "tanh_")),
    _op("softmax", E, functions=(F.softmax, torch.softmax), methods=("softmax",),
        aten=("softmax", "_softmax"), nonneg="always"),
    _op("relu6", E, functions=(F.relu6,), methods=("relu6",), nonneg="always",
        zero_below=True),
    _op("softplus", E, functions=(F.softplus,), nonneg="always"),
    *(_op(n, E, functions=(getattr(F, n),)) for n in ("elu", "silu", "hardswish", "gelu",
                                                      "mish", "selu", "celu", "hardtanh")),
    _op("layer_norm", Kind.NORM, functions=(F.layer_norm,)),
    # products
    _op("matmul", G, functions=(torch.matmul, operator.matmul, torch.bmm, torch.mm),
        methods=("matmul", "bmm", "mm", "__matmul__"), aten=("matmul", "bmm", "mm"),
        product=True),
    _op("mul", G, functions=(operator.mul, torch.mul, operator.imul),
        methods=("mul", "mul_", "__mul__"), product=True),
    _op("div", G, functions=(operator.truediv, torch.div, operator.itruediv),
        methods=("div", "div_", "__truediv__"), product=True, divides=True),
    # x @ W[e] for each group of rows (a mixture of experts' experts, transformers'
    # grouped_mm path): linear in x with a parameter weight, so its gradient is LRP-0
    # (attnlrp's linear rule, epsilon -> 0); its row offsets are held choices
    _op("grouped_mm", G, aten=("grouped_mm_fallback", "_grouped_mm"), product=True),
    # a contraction of operands (Mamba2's chunked scan): linear in an operand while the
    # others are constant (held scan parameters), so its gradient is LRP-0
    _op("einsum", G, functions=(torch.einsum,), product=True),
    _op("neg", G, functions=(operator.neg, torch.neg), methods=("neg",), product=True),
    _op("scaled_dot_product_attention", Kind.ATTENTION,
        functions=(F.scaled_dot_product_attention,)),
    _op("embedding", Kind.SOURCE, functions=(F.embedding, torch.embedding)),
    _op("cosine_similarity", Kind.SIMILARITY, functions=(F.cosine_similarity,)),
    # normalisers, held constant where they scale an activation (relprop.passes.transformer)
    *(_op(n, None, functions=(getattr(torch, n),), methods=(n,), statistic=True)
      for n in ("rsqrt", "sqrt", "reciprocal", "std")),
    _op("norm", None, functions=(torch.norm, torch.linalg.vector_norm), methods=("norm",),
        aten=("norm", "linalg_vector_norm"), statistic=True),
    # x ** p: a normaliser with 0 < |p| <= 1 (CLIP's sqrt(sum(x^2)) as pow(s, 0.5);
    # relprop.passes.transformer.hold_statistics checks p); no rule otherwise
    _op("pow", None, functions=(torch.pow, operator.pow), methods=("pow", "__pow__"),
        statistic=True),
    # limits (Mamba2's clamp of its step size Delta): known only inside held quantities
    _op("clamp", None, functions=(torch.clamp, torch.clip), methods=("clamp", "clip"),
        aten=("clamp", "clip")),
    # discrete results: positions, comparisons, counts; no relevance passes them (their
    # gradient is 0), so they are held constant where they depend on the input
    *(_op(n, None, functions=(getattr(torch, n),), methods=(n,), choice=True)
      for n in ("argmax", "argmin", "argsort", "histc", "bucketize")),
    _op("one_hot", None, functions=(F.one_hot,), choice=True),
    _op("nonzero", None, functions=(torch.nonzero,), methods=("nonzero",), choice=True),
    *(_op(n, None, functions=(getattr(operator, n), getattr(torch, n)),
          methods=(n, f"__{n}__"), choice=True) for n in ("gt", "lt", "ge", "le", "eq", "ne")),
    # sizes, and new tensors that depend on an input's shape only
    _op("size", Kind.META, functions=(getattr, len),
        methods=("size", "dim", "numel", "__len__", "ndimension", "nelement", "stride"),
        aten=("sym_size", "sym_numel", "sym_stride", "sym_storage_offset"), shape_only=True),
    _op("assert_metadata", Kind.META, aten=("_assert_tensor_metadata",), shape_only=True),
    _op("like", Kind.META, functions=(torch.zeros_like, torch.ones_like, torch.full_like,
                                      torch.empty_like),
        methods=("new_zeros", "new_ones", "new_full", "new_empty"),
        aten=("zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones",
              "new_full", "new_empty"), template=True),
    _op("constant", Kind.META, functions=(torch.zeros, torch.ones, torch.full, torch.arange,
                                          torch.empty),
        methods=("new_tensor",), aten=("zeros", "ones", "full", "arange", "empty",
                                       "scalar_tensor")),
    # views relprop has no rule for, known so that in-place writes through them are caught
    _op("other_view", None, functions=(torch.detach, torch.as_strided, torch.diagonal,
                                       torch.tensor_split),
        methods=("detach", "diagonal", "unfold", "as_strided", "tensor_split"),
        aten=(), view=True),
]

_BY_FUNCTION: dict[Any, Op] = {}
_BY_METHOD: dict[str, Op] = {}
_BY_ATEN: dict[str, Op] = {}
for _entry in _ENTRIES:
    for _f in _entry.functions:  # (some spellings are one object: F.relu_ is torch.relu_)
        assert _BY_FUNCTION.get(_f, _entry) is _entry, _entry.name
        _BY_FUNCTION[_f] = _entry
    for _m in _entry.methods:
        assert _m not in _BY_METHOD, _m
        _BY_METHOD[_m] = _entry
    for _a in _entry.aten:
        assert _a not in _BY_ATEN, _a
        _BY_ATEN[_a] = _entry

_WITH_INDICES = {
    **{d: getattr(F, f"max_pool{d}d_with_indices") for d in (1, 2, 3)},
}
_ADAPTIVE_WITH_INDICES = {d: getattr(F, f"adaptive_max_pool{d}d_with_indices")
                          for d in (1, 2, 3)}


def lookup(target: Any, method: bool = False) -> Op | None:
    """The entry of one spelling: a torch function, a method name, or an ATen overload."""
    if method:
        return _BY_METHOD.get(str(target))
    if isinstance(target, torch._ops.OpOverload):
        return _BY_ATEN.get(target._opname)
    try:
        return _BY_FUNCTION.get(target)
    except TypeError:  # an unhashable callable
        return None


def meaning(node: fx.Node) -> Op | None:
    """What a call node computes, alike for fx and export graphs (None: not known)."""
    if node.op == "call_method":
        return lookup(node.target, method=True)
    if node.op != "call_function":
        return None
    found = lookup(node.target)
    if found is None and is_stochastic_depth(node.target):
        return _DROPOUT
    return found


def is_op(node: Any, *names: str) -> bool:
    """Whether `node` is a call of one of the named entries (any spelling)."""
    if not isinstance(node, fx.Node):
        return False
    op = meaning(node)
    return op is not None and op.name in names


def is_stochastic_depth(fn: Any) -> bool:
    """torchvision.ops.stochastic_depth: the identity at inference."""
    return getattr(fn, "__name__", "") == "stochastic_depth" and \
        (getattr(fn, "__module__", "") or "").startswith("torchvision.ops")


_DROPOUT = next(e for e in _ENTRIES if e.name == "dropout")


def max_pool_with_indices(op: Op) -> tuple[Callable[..., Any], int]:
    """(the torch function computing this max pooling with its argmax, the position of
    its `return_indices` parameter)."""
    if op.name.startswith("adaptive"):
        return _ADAPTIVE_WITH_INDICES[op.pool_dims], 2
    return _WITH_INDICES[op.pool_dims], 6


def fill_position(op: Op, node: fx.Node) -> int | None:
    """The position of a padding's fill value (F.pad: 3, after normalize_padding)."""
    return 3 if op.name == "pad" and node.target is F.pad else None
