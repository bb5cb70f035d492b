"""Running LSTM and GRU layers with the recurrent rule (relprop.rules.recurrent).

The recurrence is unrolled in the forward pass (the values are the module's
own) and explained by one custom backward that walks the time steps in
reverse, in relevance form, asking the rule at each map of a step: the cell
update's sum (`RecurrentRule.split`) and the candidate's linear map
(`RecurrentRule.linear`). Whole nn.LSTM / nn.GRU modules (all layers and
directions), nn.LSTMCell / nn.GRUCell, and export's aten.lstm_cell /
aten.gru_cell run here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UnsupportedOperationError
from .rules import RecurrentRule, Tally, safe_divide
from .rules.recurrent import lrp_linear


@dataclass
class _Params:
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None

    @property
    def bias(self) -> Tensor | None:
        if self.b_ih is None:
            return None
        return self.b_ih + self.b_hh


class CellWeights:
    """Stands in for an nn.LSTMCell / nn.GRUCell when export gives only aten.*_cell ops."""

    def __init__(self, kind: str, weight_ih: Tensor, weight_hh: Tensor,
                 bias_ih: Tensor | None = None, bias_hh: Tensor | None = None) -> None:
        self.lstm = kind == "lstm_cell"
        self.weight_ih, self.weight_hh = weight_ih, weight_hh
        self.bias_ih, self.bias_hh = bias_ih, bias_hh
        self.hidden_size = weight_hh.shape[1]


def _is_cell(module: Any) -> bool:
    return isinstance(module, nn.LSTMCell | nn.GRUCell | CellWeights)


def _is_lstm(module: Any) -> bool:
    return isinstance(module, nn.LSTM | nn.LSTMCell) or getattr(module, "lstm", False) is True


def run_aten_cell(kind: str, rule: RecurrentRule, x: Tensor, hx: Any, w_ih: Tensor,
                  w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None, *,
                  target: Tensor | None = None, route: str | None = None,
                  tally: Tally | None = None) -> Any:
    """aten.lstm_cell / aten.gru_cell (from torch.export) with the recurrent rule."""
    cell = CellWeights(kind, w_ih, w_hh, b_ih, b_hh)
    hx = tuple(hx) if cell.lstm else hx
    return run_recurrent(cell, rule, x, hx, target=target, route=route, tally=tally)


def _params(module: nn.Module, layer: int, reverse: bool) -> _Params:
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    if _is_cell(module):
        sfx = ""
    get = lambda n: getattr(module, n + sfx, None)  # noqa: E731
    b_ih, b_hh = get("bias_ih"), get("bias_hh")
    return _Params(get("weight_ih").detach(), get("weight_hh").detach(),
                   None if b_ih is None else b_ih.detach(), None if b_hh is None else b_hh.detach())


# ------------------------------------------------------------------ LSTM

def _lstm_direction(x: Tensor, h: Tensor, c: Tensor, p: _Params, reverse: bool):
    """Unrolled LSTM over (B, T, E); returns outputs (B, T, H), final h, c and the cache."""
    hidden = h.shape[-1]
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    cache = []
    outputs: list[Tensor | None] = [None] * x.shape[1]
    bias = p.bias
    for t in steps:
        z = x[:, t] @ p.w_ih.T + h @ p.w_hh.T
        if bias is not None:
            z = z + bias
        i, f, g, o = z.split(hidden, dim=-1)
        i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
        g_act = torch.tanh(g)
        c_new = f * c + i * g_act
        h_new = o * torch.tanh(c_new)
        cache.append((t, h, c, g, i, f, g_act, c_new))
        outputs[t] = h_new
        h, c = h_new, c_new
    return torch.stack(outputs, 1), h, c, cache


def _lstm_direction_backward(x: Tensor, p: _Params, cache: list, r_out: Tensor, r_h: Tensor,
                             r_c: Tensor, rule: RecurrentRule, tally: Tally | None):
    """Arras' LSTM backward: returns R_x (B, T, E), R_h0, R_c0."""
    hidden = r_h.shape[-1]
    bias = p.bias
    b_g = None if bias is None else bias[2 * hidden:3 * hidden]
    w_ig, w_hg = p.w_ih[2 * hidden:3 * hidden], p.w_hh[2 * hidden:3 * hidden]
    n_in = x.shape[-1] + hidden
    r_x = torch.zeros_like(x)
    for t, h_prev, c_prev, z_g, i, f, g_act, c_new in reversed(cache):
        r_c = r_c + r_h + r_out[:, t]  # h = o * tanh(c): all to c
        r_cprev, r_g = rule.split((f * c_prev, i * g_act), c_new, r_c, tally)
        s, share = rule.linear(z_g, b_g, r_g, n_in, tally)
        r_x[:, t] = lrp_linear(x[:, t], s @ w_ig, share)
        r_h = lrp_linear(h_prev, s @ w_hg, share)
        r_c = r_cprev
    return r_x, r_h, r_c


# ------------------------------------------------------------------ GRU

def _gru_direction(x: Tensor, h: Tensor, p: _Params, reverse: bool):
    hidden = h.shape[-1]
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    cache = []
    outputs: list[Tensor | None] = [None] * x.shape[1]
    for t in steps:
        gi = x[:, t] @ p.w_ih.T
        gh = h @ p.w_hh.T
        if p.b_ih is not None:
            gi, gh = gi + p.b_ih, gh + p.b_hh
        ir, iz, in_ = gi.split(hidden, dim=-1)
        hr, hz, hn = gh.split(hidden, dim=-1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        a = in_ + r * hn
        n = torch.tanh(a)
        h_new = (1 - z) * n + z * h
        cache.append((t, h, r, z, a, n, h_new))
        outputs[t] = h_new
        h = h_new
    return torch.stack(outputs, 1), h, cache


def _gru_direction_backward(x: Tensor, p: _Params, cache: list, r_out: Tensor, r_h: Tensor,
                            rule: RecurrentRule, tally: Tally | None):
    hidden = r_h.shape[-1]
    w_in, w_hn = p.w_ih[2 * hidden:], p.w_hh[2 * hidden:]
    b_in = None if p.b_ih is None else p.b_ih[2 * hidden:]
    b_hn = None if p.b_hh is None else p.b_hh[2 * hidden:]
    n_in = x.shape[-1] + hidden
    r_x = torch.zeros_like(x)
    for t, h_prev, r, z, a, n, h_new in reversed(cache):
        r_h = r_h + r_out[:, t]
        r_n, r_hprev = rule.split(((1 - z) * n, z * h_prev), h_new, r_h, tally)
        bias = None if b_in is None else b_in + r * b_hn  # effective, per sample
        s, share = rule.linear(a, bias, r_n, n_in, tally)
        r_x[:, t] = lrp_linear(x[:, t], s @ w_in, share)
        r_h = r_hprev + lrp_linear(h_prev, (s * r) @ w_hn, share)
    return r_x, r_h


# ------------------------------------------------------------------ the autograd Function

class RecurrentRuleFunction(torch.autograd.Function):
    """A whole nn.LSTM / nn.GRU (all layers and directions) with Arras' backward.

    Inputs are batch-first (B, T, E) here; h0 / c0 are (layers * dirs, B, H).
    Outputs: (output (B, T, dirs * H), h_n, c_n) - c_n is h_n for GRU.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, h0: Tensor, c0: Tensor, target: Tensor | None,  # type: ignore[override]
                route: str | None, module: nn.Module, rule: RecurrentRule,
                tally: Tally | None) -> tuple[Tensor, Tensor, Tensor]:
        lstm = _is_lstm(module)
        layers = getattr(module, "num_layers", 1)
        dirs = 2 if getattr(module, "bidirectional", False) else 1
        layer_in = x
        caches, inputs, h_n, c_n = [], [], [], []
        for layer in range(layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                p = _params(module, layer, d == 1)
                if lstm:
                    out, h, c, cache = _lstm_direction(layer_in, h0[k], c0[k], p, d == 1)
                else:
                    out, h, cache = _gru_direction(layer_in, h0[k], p, d == 1)
                    c = h
                caches.append((p, cache))
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            inputs.append(layer_in)
            layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
        ctx.save_for_backward(x, h0, c0, layer_in, torch.stack(h_n), torch.stack(c_n))
        ctx.caches, ctx.inputs = caches, inputs
        ctx.module, ctx.rule, ctx.tally, ctx.route = module, rule, tally, route
        ctx.lstm, ctx.layers, ctx.dirs = lstm, layers, dirs
        ctx.target = target
        return layer_in, torch.stack(h_n), torch.stack(c_n)

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_hn: Tensor | None,
                 g_cn: Tensor | None) -> tuple[Tensor | None, ...]:
        x, h0, c0, out, h_n, c_n = ctx.saved_tensors
        zero = torch.zeros_like
        r_out = out * g_out if g_out is not None else zero(out)
        r_hn = h_n * g_hn if g_hn is not None else zero(h_n)
        r_cn = c_n * g_cn if (g_cn is not None and ctx.lstm) else zero(c_n)
        if not ctx.lstm and g_cn is not None:
            r_hn = r_hn + h_n * g_cn  # GRU: c_n is h_n
        r_h0, r_c0 = zero(h0), zero(c0)
        hidden = h0.shape[-1]
        for layer in reversed(range(ctx.layers)):
            layer_in = ctx.inputs[layer]
            r_in = zero(layer_in)
            for d in range(ctx.dirs):
                k = layer * ctx.dirs + d
                p, cache = ctx.caches[k]
                r_dir = r_out[..., d * hidden:(d + 1) * hidden]
                if ctx.lstm:
                    r_x, r_h, r_c = _lstm_direction_backward(
                        layer_in, p, cache, r_dir, r_hn[k], r_cn[k], ctx.rule, ctx.tally)
                    r_c0[k] = r_c
                else:
                    r_x, r_h = _gru_direction_backward(
                        layer_in, p, cache, r_dir, r_hn[k], ctx.rule, ctx.tally)
                r_h0[k] = r_h
                r_in = r_in + r_x
            r_out = r_in  # relevance at the layer below's outputs
        grad_x, grad_target = None, None
        if ctx.route == "sink":
            grad_target = r_out
        else:
            grad_x = safe_divide(r_out, x)
        return (grad_x, safe_divide(r_h0, h0), safe_divide(r_c0, c0), grad_target, None, None,
                None, None)


def run_recurrent(module: nn.Module, rule: RecurrentRule, x: Tensor, hx: Any = None, *,
                  target: Tensor | None = None, route: str | None = None,
                  tally: Tally | None = None) -> Any:
    """Call an nn.LSTM / nn.GRU / LSTMCell / GRUCell with relprop's rule; same outputs."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        raise UnsupportedOperationError(
            f"{type(module).__name__} received a PackedSequence: relprop explains padded "
            "batches (B, T, E); pad the sequences (and mask the padded steps' outputs)")
    if getattr(module, "proj_size", 0):
        raise UnsupportedOperationError("LSTM with proj_size > 0 has no relevance rule yet")
    lstm = _is_lstm(module)
    cell = _is_cell(module)
    hidden = module.hidden_size
    if cell:
        if x.dim() != 2:
            raise UnsupportedOperationError(f"{type(module).__name__} needs a batch (B, E)")
        seq = x[:, None]
        target = None if target is None else target[:, None]
    else:
        if x.dim() != 3:
            raise UnsupportedOperationError(
                f"{type(module).__name__} needs a batched input (3-D), got {x.dim()}-D")
        seq = x if module.batch_first else x.transpose(0, 1)
        if target is not None and not module.batch_first:
            target = target.transpose(0, 1)
    batch = seq.shape[0]
    k = getattr(module, "num_layers", 1) * (2 if getattr(module, "bidirectional", False) else 1)
    zeros = seq.new_zeros(k, batch, hidden)
    if hx is None:
        h0, c0 = zeros, zeros
    elif lstm:
        h0, c0 = hx
        if cell:
            h0, c0 = h0[None], c0[None]
    else:
        h0, c0 = (hx[None] if cell else hx), zeros
    out, h_n, c_n = RecurrentRuleFunction.apply(seq, h0, c0, target, route, module, rule,
                                                tally)
    if cell:
        return (h_n[0], c_n[0]) if lstm else h_n[0]
    if not module.batch_first:
        out = out.transpose(0, 1)
    return (out, (h_n, c_n)) if lstm else (out, h_n)
