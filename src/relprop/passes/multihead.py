"""nn.MultiheadAttention as the primitive nodes it computes (torchvision's ViT).

The module call is replaced by: F.linear for the in-projection (one linear over
`in_proj_weight` when query, key and value are one tensor, else one per input
with the weight's thirds or `q/k/v_proj_weight`), heads split by unflatten +
transpose, F.scaled_dot_product_attention (so the composite's attention rule,
AttnLRP or CP-LRP, applies), heads merged, F.linear for `out_proj`. Every
linear then takes the composite's rule like any nn.Linear.

What F.multi_head_attention_forward computes with need_weights=False, in eval
mode (dropout off): the same sdpa call on the same q, k, v. Masks
(`attn_mask`, `key_padding_mask`, boolean or additive) are merged as torch
merges them into one additive mask, computed as a constant: they must not
depend on the explained input. Refused (UnsupportedOperationError naming the
module): batch_first=False, need_weights not literally False, bias_k/bias_v
(add_bias_kv), add_zero_attn, and uses of the returned weights. Not checked: an
unbatched (2-d) query with a 3-d attn_mask (broadcast to a batch of one).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import UnsupportedOperationError
from ..ops import is_op, node_location

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_KEPT_META = ("nn_module_stack", "stack_trace")


def attention_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, num_heads: int,
                   like: Tensor) -> Tensor | None:
    """The additive mask (…, H, L, S) F.multi_head_attention_forward hands to sdpa.

    Boolean masks: True is a position not attended (-inf); float masks are added.
    `like`: a parameter of the module, for the dtype."""
    def canonical(mask: Tensor | None) -> Tensor | None:
        if mask is None or mask.is_floating_point():
            return mask
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill_(mask, float("-inf"))

    attn, pad = canonical(attn_mask), canonical(key_padding_mask)
    if attn is not None and attn.dim() == 3:  # (B * H, L, S)
        attn = attn.view(-1, num_heads, *attn.shape[-2:])
    if pad is not None:  # (B, S), or (S,) for an unbatched query
        pad = pad.view(pad.shape[0], 1, 1, pad.shape[-1]) if pad.dim() == 2 else \
            pad.view(1, -1)
    if attn is None:
        return pad
    return attn if pad is None else attn + pad


def expand_multihead_attention(graph: fx.Graph, node: fx.Node, m: nn.MultiheadAttention,
                               path: str) -> None:
    """Replace the call_module node of `m` by the nodes it computes (module docstring)."""
    where = node_location(node)

    def refuse(why: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"nn.MultiheadAttention {where}: {why}; relprop explains it only with "
            "batch_first=True, need_weights=False, no add_bias_kv and no add_zero_attn")

    try:
        bound = _SIGNATURE.bind(m, *node.args, **node.kwargs)
    except TypeError as exc:
        raise refuse(f"unexpected arguments ({exc})") from exc
    bound.apply_defaults()
    a = bound.arguments
    if not m.batch_first:
        raise refuse("batch_first=False")
    if a["need_weights"] is not False:
        raise refuse(f"need_weights={a['need_weights']!r} (the weights have no relevance "
                     "rule; pass need_weights=False)")
    if m.bias_k is not None or m.bias_v is not None:
        raise refuse("add_bias_kv=True")
    if m.add_zero_attn:
        raise refuse("add_zero_attn=True")
    users = list(node.users)
    for user in users:
        if not is_op(user, "getitem") or \
                user.args[1] not in (0, 1) or (user.args[1] == 1 and user.users):
            raise refuse("its output is used other than as `out, _ = attention(...)`")

    query, key, value = a["query"], a["key"], a["value"]
    heads = m.num_heads

    def call(fn: Any, *args: Any, label: str | None = None, **kwargs: Any) -> fx.Node:
        with graph.inserting_before(node):
            new = graph.call_function(fn, args, kwargs)
        new.meta.update({k: v for k, v in node.meta.items() if k in _KEPT_META})
        new.meta["relprop_path"] = path
        new.meta["relprop_label"] = f"MultiheadAttention {label or fn.__name__}"
        return new

    def param(name: str) -> fx.Node | None:
        owner, _, attr = name.rpartition(".")
        if getattr(m.get_submodule(owner) if owner else m, attr) is None:
            return None
        with graph.inserting_before(node):
            return graph.get_attr(f"{path}.{name}" if path else name)

    def linear(x: Any, w: Any, b: Any, label: str) -> fx.Node:
        out = call(F.linear, x, w, b, label=label)
        out.meta["relprop_module_type"] = nn.Linear
        return out

    bias = param("in_proj_bias")
    biases: list[Any] = [None] * 3
    if bias is not None:
        parts = call(torch.chunk, bias, 3, label="in_proj_bias chunks")
        biases = [call(operator.getitem, parts, i, label="in_proj_bias chunk") for i in range(3)]
    if m._qkv_same_embed_dim and query is key and key is value:
        proj = linear(query, param("in_proj_weight"), bias, "in_proj")
        qkv = call(torch.chunk, proj, 3, -1, label="q, k, v")
        q, k, v = (call(operator.getitem, qkv, i, label="q k v"[2 * i]) for i in range(3))
    else:
        if m._qkv_same_embed_dim:
            ws = call(torch.chunk, param("in_proj_weight"), 3, label="in_proj_weight chunks")
            weights = [call(operator.getitem, ws, i, label="in_proj_weight chunk")
                       for i in range(3)]
        else:
            weights = [param(f"{n}_proj_weight") for n in "qkv"]
        q, k, v = (linear(x, w, b, f"{n}_proj") for x, w, b, n in
                   zip((query, key, value), weights, biases, "qkv", strict=True))
    head_dim = m.embed_dim // heads
    q, k, v = (call(torch.transpose, call(torch.unflatten, t, -1, (heads, head_dim),
                                          label=f"{n} heads"), -3, -2, label=f"{n} heads")
               for t, n in zip((q, k, v), "qkv", strict=True))
    attn_mask, padding, causal = a["attn_mask"], a["key_padding_mask"], bool(a["is_causal"])
    if causal and padding is None:
        mask = None  # as torch: the causal hint replaces attn_mask
    else:
        causal = False
        mask = None
        if attn_mask is not None or padding is not None:
            mask = call(attention_mask, attn_mask, padding, heads, param("out_proj.weight"),
                        label="mask (attn_mask / key_padding_mask must not depend on the "
                              "explained input)")
    out = call(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=0.0,
               is_causal=causal, label="attention")
    merged = call(torch.flatten, call(torch.transpose, out, -3, -2, label="merge heads"), -2,
                  label="merge heads")
    result = linear(merged, param("out_proj.weight"), param("out_proj.bias"), "out_proj")
    for user in users:
        if user.args[1] == 0:
            user.replace_all_uses_with(result)
        graph.erase_node(user)
    graph.erase_node(node)
