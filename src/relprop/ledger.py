"""Where relevance went: per node, what arrived, what was passed on, what leaked.

Built from a recorded backward pass (record=True). For a linear-like layer the
leak splits into what its bias absorbed, what its stabilizer absorbed and the
rest ("other": relevance that landed on zero-valued inputs of rules that hand
out relevance directly, or at z = 0 in gamma); for sums it is the stabilizer,
or the constant summand (counted as bias) in x + c, and for a concatenation the
constant piece (a class token) beside the input's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .ops import Kind


def per_sample(t: Tensor, batch: int) -> Tensor:
    """Sum over everything but the leading batch dimension."""
    return t.reshape(batch, -1).sum(1)


@dataclass
class LedgerEntry:
    """The relevance balance of one node (per sample, shape (B,))."""

    node: str
    op: str
    path: str
    rule: str | None
    relevance_in: Tensor  # arriving at the node's output
    relevance_out: Tensor  # handed to the node's inputs
    bias: Tensor  # absorbed by the bias
    stabilizer: Tensor  # absorbed by the stabilizer

    @property
    def leaked(self) -> Tensor:
        return self.relevance_in - self.relevance_out

    @property
    def other(self) -> Tensor:
        return self.leaked - self.bias - self.stabilizer


_BALANCES = ("relevance_in", "relevance_out", "bias", "stabilizer")


class Ledger:
    """All nodes' balances in forward order, plus the totals."""

    def __init__(self, entries: list[LedgerEntry], explained: Tensor, at_input: Tensor) -> None:
        self.entries = entries
        self.explained = explained  # relevance put at the output, per sample
        self.at_input = at_input  # relevance that reached the inputs, per sample

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, node: str) -> LedgerEntry:
        for e in self.entries:
            if e.node == node or e.path == node:
                return e
        raise KeyError(node)

    def totals(self) -> dict[str, Tensor]:
        """Per-sample sums of what biases, stabilizers and the rest absorbed."""
        zero = torch.zeros_like(self.explained)
        bias = sum((e.bias for e in self.entries), zero)
        stab = sum((e.stabilizer for e in self.entries), zero)
        leaked = sum((e.leaked for e in self.entries), zero)
        return {"bias": bias, "stabilizer": stab, "other": leaked - bias - stab,
                "leaked": leaked}

    def table(self, sample: int = 0) -> str:
        """A text table of one sample's balances."""
        rows = [f"{'node':<28} {'op':<24} {'rule':<16} {'in':>12} {'out':>12} {'bias':>11} "
                f"{'stabilizer':>11} {'other':>11}"]
        for e in self.entries:
            v = [t[sample].item() for t in (e.relevance_in, e.relevance_out, e.bias,
                                              e.stabilizer, e.other)]
            rows.append(f"{e.node[:28]:<28} {e.op[:24]:<24} {(e.rule or '-')[:16]:<16} "
                        f"{v[0]:>12.5g} {v[1]:>12.5g} {v[2]:>11.3g} {v[3]:>11.3g} {v[4]:>11.3g}")
        rows.append(f"explained {self.explained[sample].item():.6g}, at input "
                    f"{self.at_input[sample].item():.6g}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    @classmethod
    def concat(cls, ledgers: list[Ledger]) -> Ledger:
        """Ledgers of consecutive chunks of one batch, joined along the batch: (B,)."""
        return cls._joined(ledgers, torch.cat)

    @classmethod
    def stack(cls, ledgers: list[Ledger]) -> Ledger:
        """Ledgers of K targets of one batch, side by side: (B, K) balances."""
        return cls._joined(ledgers, lambda ts: torch.stack(ts, 1))

    @classmethod
    def _joined(cls, ledgers: list[Ledger], join: Callable[[list[Tensor]], Tensor]) -> Ledger:
        """Ledgers of one program (the same nodes in the same order), tensor by tensor."""
        entries = [LedgerEntry(e.node, e.op, e.path, e.rule,
                               *(join([getattr(q, f) for q in parts]) for f in _BALANCES))
                   for parts in zip(*(lg.entries for lg in ledgers), strict=True)
                   for e in parts[:1]]
        return cls(entries, join([lg.explained for lg in ledgers]),
                   join([lg.at_input for lg in ledgers]))


def build_ledger(program, run, batch: int, explained: Tensor,
                 at_input: Tensor) -> tuple[Ledger, dict[str, Tensor]]:
    """Per-node balances and per-node relevance maps from one recorded backward pass."""
    rec = run.recording
    entries: list[LedgerEntry] = []
    layers: dict[str, Tensor] = {}
    for i, step in enumerate(program.steps):
        value = rec.values[i]
        if not step.dynamic or step.op == "output":
            continue
        if isinstance(value, tuple | list):  # several outputs (chunk, split)
            parts = [(e, rec.out_grads.get((i, j))) for j, e in enumerate(value)
                     if isinstance(e, Tensor)]
            if not parts or step.kind is Kind.META:
                continue
            r_in = sum((per_sample(e.detach() * g, batch) for e, g in parts if g is not None),
                       torch.zeros(batch, dtype=parts[0][0].dtype))
            r_node = None
        elif isinstance(value, Tensor):
            grad = rec.out_grads.get(i)
            r_node = value.detach() * grad if grad is not None else torch.zeros_like(value)
            direct = rec.shadow_out.get(i)  # relevance on the shadow channel (relprop.shadow)
            if direct is not None:
                r_node = r_node + direct
            r_in = None
        else:
            continue
        if step.op == "placeholder":
            layers[step.name] = r_node
            continue
        if step.kind is Kind.META:
            continue
        if r_node is not None:
            layers[step.name] = r_node
            r_in = per_sample(r_node, batch)
        out = torch.zeros_like(r_in)
        for key, src, elem in rec.edges.get(i, []):
            g = rec.edge_grads.get(key)
            if g is not None:
                v = rec.values[src] if elem is None else rec.values[src][elem]
                out = out + per_sample(v.detach() * g, batch)
        for key in rec.shadow_edges.get(i, []):
            g = rec.shadow_edge_grads.get(key)
            if g is not None:
                out = out + per_sample(g, batch)
        tally = rec.tallies.get(i)
        zero = torch.zeros_like(out)
        spec = step.node.meta["relprop"]
        # a rule tallies per leading row: sums over Swin's windows (B * windows, N, C) too
        bias = per_sample(tally.bias, batch) if tally is not None and tally.bias is not None \
            else zero
        stab = per_sample(tally.stabilizer, batch) if tally is not None and \
            tally.stabilizer is not None else zero
        if spec.kind is Kind.SOURCE:  # token embeddings: what arrives is the input's
            out = r_in
        # x + c leaks what the constant c took, as a bias; an attention mask too (relprop.
        # passes.transformer: the scores take s * grad, the mask's c * grad is the leak)
        if spec.constant_summand:
            bias = r_in - out
        elif spec.kind is Kind.PROPORTIONAL:  # a sum leaks only to its stabilizer
            stab = r_in - out
        entries.append(LedgerEntry(
            node=step.name, op=spec.label, path=spec.path,
            rule=step.rule.describe() if step.rule is not None else _family(spec.kind),
            relevance_in=r_in, relevance_out=out, bias=bias, stabilizer=stab,
        ))
    return Ledger(entries, explained, at_input), layers


def _family(kind: Kind) -> str:
    return {Kind.GRADIENT: "gradient", Kind.PROPORTIONAL: "proportional",
            Kind.ELEMENTWISE: "identity", Kind.SOFTMAX: "attention softmax"}.get(
        kind, kind.value)
