"""Arras et al.'s LRP for LSTMs written from the paper's equations, one sample at a time.

Per time step (reverse order): R(c_t) += R(h_t); the cell update c_t = f*c_(t-1) + i*g
is split by the epsilon rule on an identity map with N = 2H inputs; the
candidate's pre-activation z = W_ig x + W_hg h + b gets the epsilon rule with
N = E + H inputs; gates receive nothing. `lrp_linear` is the paper's
rule: R_i = sum_j (x_i w_ij + bf (b_j + eps sign(z_j)) / N) / (z_j + eps sign(z_j)) R_j.
"""

from __future__ import annotations

import numpy as np


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def lrp_linear(x, W, b, z, R, N, eps, bf):
    """x (D,), W (D, M), b (M,), z (M,), R (M,) -> (D,), term by term."""
    sign = np.where(z >= 0, 1.0, -1.0)
    numer = W * x[:, None] + bf * (b[None, :] + eps * sign[None, :]) / N
    return (numer / (z + eps * sign)[None, :] * R[None, :]).sum(1)


def lstm_direction(x, h, c, Wi, Wh, b, reverse):
    H = h.shape[0]
    T = x.shape[0]
    steps = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    hs, cs = {}, {}
    store = []
    for t in steps:
        z = Wi @ x[t] + Wh @ h + b
        i, f, g, o = sigmoid(z[:H]), sigmoid(z[H:2 * H]), np.tanh(z[2 * H:3 * H]), \
            sigmoid(z[3 * H:])
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        store.append(dict(t=t, h=h, c=c, zg=z[2 * H:3 * H], i=i, f=f, g=g, c_new=c_new))
        hs[t], cs[t] = h_new, c_new
        h, c = h_new, c_new
    out = np.stack([hs[t] for t in range(T)])
    return out, h, c, store


def lstm_direction_lrp(x, Wi, Wh, b, store, R_out, R_h, R_c, eps, bf):
    H = R_h.shape[0]
    E = x.shape[1]
    Rx = np.zeros_like(x)
    Wg_x, Wg_h, bg = Wi[2 * H:3 * H], Wh[2 * H:3 * H], b[2 * H:3 * H]
    for s in reversed(store):
        t = s["t"]
        R_c = R_c + R_h + R_out[t]
        eye, zero = np.eye(H), np.zeros(H)
        R_cprev = lrp_linear(s["f"] * s["c"], eye, zero, s["c_new"], R_c, 2 * H, eps, bf)
        R_g = lrp_linear(s["i"] * s["g"], eye, zero, s["c_new"], R_c, 2 * H, eps, bf)
        Rx[t] = lrp_linear(x[t], Wg_x.T, bg, s["zg"], R_g, E + H, eps, bf)
        R_h = lrp_linear(s["h"], Wg_h.T, bg, s["zg"], R_g, E + H, eps, bf)
        R_c = R_cprev
    return Rx, R_h, R_c


def lstm_lrp(lstm, x, R_out, R_hn, R_cn, eps, bf):
    """Relevance of one sample x (T, E) of a torch nn.LSTM (batch_first irrelevant here)."""
    dirs = 2 if lstm.bidirectional else 1
    H = lstm.hidden_size
    get = lambda n: getattr(lstm, n).detach().numpy()  # noqa: E731
    inputs, stores = [], []
    layer_in = x
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            b = get("bias_ih" + sfx) + get("bias_hh" + sfx) if lstm.bias else np.zeros(4 * H)
            Wi, Wh = get("weight_ih" + sfx), get("weight_hh" + sfx)
            out, _, _, store = lstm_direction(layer_in, np.zeros(H), np.zeros(H), Wi, Wh, b, d)
            stores.append((Wi, Wh, b, store))
            outs.append(out)
        inputs.append(layer_in)
        layer_in = np.concatenate(outs, -1)
    R = R_out
    for layer in reversed(range(lstm.num_layers)):
        R_in = np.zeros_like(inputs[layer])
        for d in range(dirs):
            k = layer * dirs + d
            Wi, Wh, b, store = stores[k]
            Rx, _, _ = lstm_direction_lrp(inputs[layer], Wi, Wh, b, store,
                                          R[:, d * H:(d + 1) * H], R_hn[k], R_cn[k], eps, bf)
            R_in = R_in + Rx
        R = R_in
    return R
