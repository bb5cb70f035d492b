"""Attention-mask helpers that torch.fx leaves as one call (`torch.fx.wrap`).

timm's unfused attention calls `resolve_self_attn_mask(N, attn, attn_mask,
is_causal)` (it reads `attn` only for its dtype and device) and
`maybe_add_mask(attn, bias)`. With no mask and no causal flag (a ViT) the bias
is None and the add is the scores themselves: both calls are removed. With a
mask the bias is computed as a constant (held: no relevance) and added to the
scores, a sum with a constant summand like any additive mask.
"""

from __future__ import annotations

import operator

from torch import fx


def _is(node: fx.Node, module: str, name: str) -> bool:
    t = node.target
    return node.op == "call_function" and getattr(t, "__name__", "") == name and \
        (getattr(t, "__module__", "") or "").startswith(module)


def wrapped_attention_masks(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if not _is(node, "timm.", "resolve_self_attn_mask"):
            continue
        args = dict(zip(("seq_len", "attn", "attn_mask", "is_causal"), node.args, strict=False))
        args.update(node.kwargs)
        empty = args.get("attn_mask") is None and args.get("is_causal", False) is False
        adds = [u for u in node.users if _is(u, "timm.", "maybe_add_mask") and
                len(u.args) == 2 and u.args[1] is node]
        if len(adds) != len(node.users):
            continue  # used otherwise: left for the catalogue to refuse
        for add in adds:
            if empty:
                add.replace_all_uses_with(add.args[0])
            else:
                add.target, add.kwargs = operator.add, {}
            if empty:
                graph.erase_node(add)
        if empty:
            graph.erase_node(node)
        else:
            node.meta["relprop_constant"] = "statistic"  # reads attn's dtype only
