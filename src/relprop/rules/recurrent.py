"""The recurrent rule: LRP for LSTM and GRU layers, after Arras et al. (2017, 2019).

In relevance form, walking the time steps in reverse (relprop.recurrent runs it):

- h_t = o_t * tanh(c_t): the gate o takes nothing, tanh passes relevance on:
  R(c_t) += R(h_t) ("signal-take-all").
- c_t = f_t * c_(t-1) + i_t * g_t: a sum, split in proportion to the two
  terms (`RecurrentRule.split`: the epsilon rule on an identity map); within
  each product the gate (f, i) takes nothing and the signal (c_(t-1), g_t)
  takes all.
- g_t = tanh(W_ig x_t + W_hg h_(t-1) + b): tanh passes relevance on; the
  pre-activation is one linear map of [x_t; h_(t-1)] and takes the epsilon
  rule (`RecurrentRule.linear`, Arras' default epsilon 0.001), which hands
  relevance to x_t and h_(t-1).

Bias handling (`bias=`, validated by `RuleBase`): "absorb" (bias in the denominator,
relevance it explains is lost), "ignore" (left out of the denominator),
"distribute" with `bias_factor`: as in Arras' `lrp_linear`, each of the N inputs
of a map (N = input size + hidden size for the gates, 2 x hidden size for the
cell update) also receives bias_factor * (b_j + eps * sign(z_j)) / N of each
output's share; bias_factor = 1 conserves relevance exactly.

GRU (h_t = (1 - z_t) * n_t + z_t * h_(t-1), n_t = tanh(W_in x_t + b_in +
r_t * (W_hn h_(t-1) + b_hn))): the update gate z interpolates between the
candidate n_t and the previous state. relprop treats that interpolation like
the LSTM's cell update: a sum of two gated signals, split in proportion to
(1 - z) n_t and z h_(t-1), the gate z taking nothing, because z only decides
how much of each signal passes, not what the signal is. The reset gate r
scales the recurrent contribution: the candidate's pre-activation is a linear
map of [x_t; h_(t-1)] with effective weights [W_in, diag(r) W_hn] and bias
b_in + r * b_hn, explained with the epsilon rule, r itself taking nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import TINY, RuleBase, Tally, check_nonnegative


@dataclass(frozen=True)
class _ArrasEpsilon:
    """The recurrent rule's first field, ahead of `RuleBase`'s `bias`: it reads
    RecurrentRule(epsilon=..., bias=..., bias_factor=...) in describe() and summaries,
    and RecurrentRule(1e-3) sets the epsilon."""

    epsilon: float = 1e-3


@dataclass(frozen=True)
class RecurrentRule(RuleBase, _ArrasEpsilon):
    """The rule for LSTM/GRU layers: epsilon and bias handling of Arras et al.

    A `RuleBase` (bias modes and validation as every rule's), not a `Rule`: it acts
    on the maps inside a recurrent layer (`linear`, `split`), not on a layer z = W x + b.
    """

    bias_factor: float = 1.0
    name = "recurrent"

    def __post_init__(self) -> None:
        super().__post_init__()  # bias mode and epsilon
        check_nonnegative("RecurrentRule", "bias_factor", self.bias_factor,
                          "the share of bias and stabilizer relevance handed to the inputs")

    @property
    def hands_out_directly(self) -> bool:
        """Relevance leaves an LSTM/GRU as relevance, not as a gradient (relprop.shadow)."""
        return True

    def describe(self) -> str:
        extra = f", bias_factor={self.bias_factor:g}" if self.bias == "distribute" else ""
        return f"recurrent(eps={self.epsilon:g}, {self.bias}{extra})"

    # -- the rule at each map of a time step --------------------------------------------

    def linear(self, z: Tensor, bias: Tensor | None, r: Tensor, n_inputs: int,
               tally: Tally | None) -> tuple[Tensor, Tensor | None]:
        """The epsilon rule at a linear map z = W [inputs] + bias with `n_inputs` inputs:
        s = R / stab(z), and each input's distributed share (shape (B, 1), or None);
        an input then gets R_in = `lrp_linear`(inp, W^T s, share). Tallies the leak."""
        zz = z - bias if (bias is not None and self.bias == "ignore") else z
        sign = torch.where(zz >= 0, 1.0, -1.0).to(zz.dtype)
        s = r / (zz + (self.epsilon or TINY) * sign)  # epsilon=0: LRP-0's guard against 0/0
        share = None
        if self.bias == "distribute":  # bias_factor * sum_j (b_j + eps * sign_j) * s_j / N
            term = self.epsilon * sign
            if bias is not None:
                term = term + bias
            share = self.bias_factor * (term * s).sum(-1, keepdim=True) / n_inputs
        if tally is not None:
            keep = 1.0 - self.bias_factor if self.bias == "distribute" else 1.0
            b = s * bias * keep if (bias is not None and self.bias != "ignore") else None
            tally.add(bias=b, stabilizer=s * self.epsilon * sign * keep)
        return s, share

    def split(self, parts: tuple[Tensor, Tensor], total: Tensor, r: Tensor,
              tally: Tally | None) -> tuple[Tensor, Tensor]:
        """Split R of total = a + b between a and b (an identity map, N = 2 x hidden)."""
        s, share = self.linear(total, None, r, 2 * total.shape[-1], tally)
        a, b = parts
        ra, rb = a * s, b * s
        if share is not None:
            ra, rb = ra + share, rb + share
        return ra, rb


def lrp_linear(inp: Tensor, weight_t_s: Tensor, share: Tensor | None) -> Tensor:
    """R_in_i = inp_i (W^T s)_i + bias_factor * sum_j (b_j + eps sign_j) s_j / N.

    `weight_t_s` is W^T s with s = R / stab(z); `share` the distributed term (or None).
    """
    r = inp * weight_t_s
    return r if share is None else r + share
