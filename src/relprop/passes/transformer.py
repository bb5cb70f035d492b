"""Graph passes for what transformers are made of, beyond convolutions and ReLUs.

- `linear_products`: `x @ W` and `addmm(b, x, W)` with a parameter W (GPT-2's
  Conv1D) are linear layers: rewritten to F.linear(x, W.T, b), so the composite's
  rule applies to them like to any nn.Linear.
- `scaled_products`: baddbmm (BLOOM's ALiBi scores) and addmm without a parameter
  weight written out as a sum of a constant summand and a product.
- `hold_statistics`: a normaliser (rsqrt / sqrt / norm / std / reciprocal) that
  only scales an activation (RMSNorm's x * rsqrt(mean(x^2) + eps), x / |x|) is held
  constant: it carries no relevance, so what computes it needs no rule.
- `collapse_leaf_modules`: torch.export traces into every module; a module relprop
  treats as one operation (registered types such as Hugging Face's activations,
  or the user's `leaves`) is folded back into one node.
- `attention_weights`: a softmax whose output is an operand of a product of two
  activations is attention weights (Kind.SOFTMAX): the composite's attention rule
  chooses its rule (AttnLRP: Taylor, the gradient), and the product knows which
  operand holds the weights (CP-LRP holds them constant); a constant mask added to
  its scores passes relevance to the scores as inside scaled_dot_product_attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops import Kind, is_op, meaning, node_args, spec
from ..registry import module_family

# ops a held-constant statistic may pass through on its way to the product
_PASSING = ("cast", "expand", "view", "reshape", "unsqueeze", "flatten")


def linear_products(graph: fx.Graph, root: nn.Module) -> None:
    """matmul(x, W) / addmm(b, x, W) with a 2-d parameter W -> F.linear(x, W.T, b)."""
    for node in list(graph.nodes):
        if is_op(node, "matmul"):  # (bmm never has a 2-d parameter: left alone below)
            x, w = node.args[0], node.args[1]
            bias = None
        elif is_op(node, "addmm") and not node.kwargs:
            bias, x, w = node.args[0], node.args[1], node.args[2]
        else:
            continue
        if not (_is_parameter(w, root, dims=2) and (bias is None or _is_parameter(bias, root))):
            continue
        with graph.inserting_before(node):
            wt = graph.call_function(torch.t, (w,))
            linear = graph.call_function(F.linear, (x, wt, bias))
        linear.meta.update(node.meta)
        linear.meta["relprop_label"] = f"{node.meta.get('relprop_label') or _name(node)} " \
                                       "(as linear)"
        linear.meta["relprop_module_type"] = nn.Linear
        node.replace_all_uses_with(linear)
        graph.erase_node(node)


def scaled_products(graph: fx.Graph) -> None:
    """baddbmm(input, b1, b2, beta=, alpha=) = beta * input + alpha * (b1 @ b2), and an
    addmm whose weight is not a parameter (left by `linear_products`), written out: the
    product of two activations takes the bilinear rule, a constant `input` (BLOOM's ALiBi
    bias) is a constant summand (before an attention softmax: a mask-like bias the scores
    pass relevance through, as in `attention_weights`)."""
    for node in list(graph.nodes):
        if is_op(node, "baddbmm"):
            matmul = torch.bmm
        elif is_op(node, "addmm"):
            matmul = torch.mm
        else:
            continue
        names = ("input", "batch1", "batch2") if matmul is torch.bmm else ("input", "mat1",
                                                                            "mat2")
        a = dict(zip((*names, "beta", "alpha"), node.args, strict=False))
        a.update(node.kwargs)
        bias, beta, alpha = a[names[0]], a.get("beta", 1), a.get("alpha", 1)
        made = []
        with graph.inserting_before(node):
            out = graph.call_function(matmul, (a[names[1]], a[names[2]]))
            made.append(out)
            if alpha != 1:
                out = graph.call_function(torch.mul, (out, alpha))
                made.append(out)
            if beta != 0:  # (beta = 0 ignores the input, nan and inf included)
                if beta != 1:
                    bias = graph.call_function(torch.mul, (bias, beta))
                    made.append(bias)
                out = graph.call_function(torch.add, (bias, out))
                made.append(out)
        for new in made:
            new.meta.update({k: v for k, v in node.meta.items()
                             if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _is_parameter(node: Any, root: nn.Module, dims: int | None = None) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    from ..trace import attribute

    value = attribute(root, str(node.target))
    return isinstance(value, torch.Tensor) and (dims is None or value.dim() == dims)


def hold_statistics(graph: fx.Graph) -> set[fx.Node]:
    """Normalisers that only scale activations, marked to be held constant."""
    held: set[fx.Node] = set()
    for node in graph.nodes:
        what = meaning(node)
        if what is None or not what.statistic or (what.name == "pow" and not _root(node)):
            continue
        if node.users and all(_scales(node, user) for user in node.users):
            node.meta["relprop_constant"] = "statistic"
            held.add(node)
    return held


def _root(node: fx.Node) -> bool:
    """x ** p with a number 0 < |p| <= 1 (a root or its reciprocal: a normaliser)."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    return isinstance(p, int | float) and not isinstance(p, bool) and 0 < abs(p) <= 1


def _scales(node: fx.Node, user: fx.Node) -> bool:
    """`user` multiplies an activation by `node`, or divides one by it (maybe through
    casts and reshapes)."""
    if is_op(user, *_PASSING) and user.args and user.args[0] is node:
        return all(_scales(user, u) for u in user.users) and bool(user.users)
    if is_op(user, "mul"):
        return node in user.args[:2]
    if is_op(user, "div"):
        return len(user.args) > 1 and user.args[1] is node and user.args[0] is not node
    return False


def collapse_leaf_modules(graph: fx.Graph, root: nn.Module, leaves: dict[str, str]) -> None:
    """Fold the nodes torch.export traced inside a leaf module back into one call.

    `root` is the user's model (module paths from the export's module stack)."""
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in graph.nodes:
        path = _leaf_path(node, root, leaves)
        if path is None:
            continue
        if runs and runs[-1][0] == path and _adjacent(runs[-1][1][-1], node):
            runs[-1][1].append(node)
        else:
            runs.append((path, [node]))
    for path, nodes in runs:
        inside = set(nodes)
        inputs = [a for n in nodes for a in node_args(n) if a not in inside
                  and a.op != "get_attr"]
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(set(inputs)) != 1 or len(outputs) != 1:
            continue  # not a one-tensor-in, one-tensor-out call: leave it traced
        module = root.get_submodule(path)
        with graph.inserting_before(nodes[0]):
            call = graph.call_function(_forward_of(module), (inputs[0],))
        call.meta.update({k: v for k, v in nodes[0].meta.items()
                          if k in ("nn_module_stack", "stack_trace")})
        call.meta["relprop_path"] = path
        call.meta["relprop_label"] = type(module).__name__
        call.meta["relprop_family"] = module_family(module, path, leaves)
        outputs[0].replace_all_uses_with(call)
        for n in reversed(nodes):
            graph.erase_node(n)


def _adjacent(prev: fx.Node, node: fx.Node) -> bool:
    return prev.next is node


def _leaf_path(node: fx.Node, root: nn.Module, leaves: dict[str, str]) -> str | None:
    """The outermost module on the node's module stack that relprop treats as a leaf."""
    if node.op != "call_function":
        return None
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else None
        if not path:
            continue
        path = path.removeprefix("L['self'].").removeprefix("L__self__.")
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        if module_family(module, path, leaves) is not None:
            return path
    return None


def _forward_of(module: nn.Module) -> Callable[..., Any]:
    def forward(x: Any) -> Any:
        return type(module).forward(module, x)

    forward.__name__ = type(module).__name__
    return forward


def attention_weights(graph: fx.Graph) -> None:
    """Softmax outputs multiplied with another activation are attention weights."""
    for node in graph.nodes:
        s = spec(node)
        if s is None or s.kind is not Kind.BILINEAR:
            continue
        for position, operand in enumerate(node.args[:2]):
            softmax = _softmax_source(operand)
            if softmax is not None:
                sm = spec(softmax)
                sm.kind = Kind.SOFTMAX  # its rule is the composite's (AttentionRule.softmax)
                sm.label = f"{sm.label} (attention weights)"
                s.weights = position
                _mask_passes(softmax)


def _mask_passes(softmax: fx.Node) -> None:
    """scores + mask before an attention softmax: the constant mask is a summand that takes
    nothing where it is 0 and whose masked entries carry no relevance, so the scores take
    all of it, as inside scaled_dot_product_attention (no stabilizer: eager = SDPA).

    Every constant summand between the scores and the softmax, through views, is such a
    mask: a float attn_mask of SDPA adds a position bias and the mask alike (Swin adds its
    relative position bias, views, then adds its shift mask)."""
    node = softmax.args[0] if softmax.args else None
    while isinstance(node, fx.Node) and spec(node) is not None:
        s = spec(node)
        # tensor operands (sizes, which torch.export computes in the graph, are not)
        tensors = [a for a in node_args(node) if spec(a) is not None and spec(a).kind
                   is not Kind.META]
        if s.kind is Kind.PROPORTIONAL and s.constant_summand:
            s.kind = Kind.GRADIENT
            s.label = f"{s.label} (attention mask)"
            scores = [a for a in tensors if a in node.args[:2]]
            if len(scores) != 1:
                return
            node = scores[0]
            continue
        if s.kind is Kind.GRADIENT and not s.product and node.args and \
                isinstance(node.args[0], fx.Node) and tensors == [node.args[0]]:
            node = node.args[0]  # casts, views
            continue
        return


def _softmax_source(node: Any) -> fx.Node | None:
    """The softmax node `node` is (through moves, casts and dropout), if any."""
    while isinstance(node, fx.Node):
        s = spec(node)
        if s is None:
            return None
        if is_op(node, "softmax"):
            return node
        if s.kind is Kind.GRADIENT and not s.product and len(
                [a for a in node_args(node) if spec(a) is not None]) == 1 and node.args:
            node = node.args[0]
            continue
        return None
    return None


def grouped_query(graph: fx.Graph) -> None:
    """K and V repeated per query head (`repeat_kv`: unsqueeze, expand, reshape) before
    scaled_dot_product_attention: the attention takes the grouped K, V with
    `enable_gqa=True` instead. Same values; the relevance of the copies, which the
    repeat sums back, is summed by the kernel's backward; no repeated copy is kept."""
    for node in graph.nodes:
        if not is_op(node, "scaled_dot_product_attention") or len(node.args) < 3 or \
                node.kwargs.get("enable_gqa") or len(node.args) > 7:
            continue
        sources = [_repeated_source(a) for a in node.args[1:3]]
        if any(s is None for s in sources):
            continue
        node.args = (node.args[0], *sources, *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}


def _repeated_source(node: Any) -> fx.Node | None:
    """x if node is x[:, :, None].expand(B, kv, n, T, D).reshape(B, kv * n, T, D)."""
    if not is_op(node, "reshape", "view"):
        return None
    expand = _through_full_slices(node.args[0])
    if not is_op(expand, "expand"):
        return None
    unsqueeze = _through_full_slices(expand.args[0])
    if not is_op(unsqueeze, "unsqueeze") or unsqueeze.args[1:] != (2,):
        return None
    source = _through_full_slices(unsqueeze.args[0])
    shapes = [n.meta.get("val") for n in (node, source)]
    if not isinstance(source, fx.Node) or any(v is None or not hasattr(v, "shape")
                                              for v in shapes):
        return None
    out, src = shapes[0].shape, shapes[1].shape
    if len(out) != 4 or len(src) != 4 or out[0] != src[0] or out[2:] != src[2:]:
        return None
    return source


def _through_full_slices(node: Any) -> Any:
    """Skip `x[:, ...]` slices that take a whole dimension (torch.export writes them)."""
    while is_op(node, "slice") and len(node.args) >= 4 and \
            node.args[2] == 0 and node.args[3] == 9223372036854775807 and \
            (len(node.args) < 5 or node.args[4] == 1):
        node = node.args[0]
    return node
