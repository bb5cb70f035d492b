"""A tiny random Mamba2 (pure-PyTorch path, no CUDA kernels) built offline from its config,
and an explicit layer-by-layer MambaLRP reference for it (issue 19).

Written out as tests/reference_families.py's Mamba reference is: from the state dict
alone, sharing no code with relprop or with Hugging Face's forward. The scan is the
plain sequential recurrence of the state-space model, per head and position,

    h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t,    y_t = C_t h_t + D x_t,

not Hugging Face's chunked (SSD) form, so the reference does not follow the traced
program's ops. The rules (MambaLRP, Jafari et al., NeurIPS 2024, in AttnLRP's spirit):

- Delta = clamp(softplus(dt + dt_bias)), exp(Delta A), B and C held constant: the scan
  is linear in x, each state a proportional sum of the decayed previous state and the
  new input, read out by C; D x a constant scale;
- the gate: the gated RMSNorm's y * silu(z) uniform (half each), SiLU identity;
- RMSNorm (the blocks', the final one, the gated one per group): identity;
- the causal depthwise conv1d, the projections and the head: epsilon rule (epsilon -> 0),
  bias absorbed; B and C, split off the conv1d's output with x, take no relevance.

Hugging Face runs the scan, the norms and the residual (`residual_in_fp32`) in float32
inside a float64 model; the forward here casts where it does, and computes the rest in
float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from reference_families import _build, _ra, _sd
from torch import Tensor

F32 = torch.float32


def tiny_mamba2(seed: int = 0, **overrides: Any) -> Any:
    """4 heads of 8 in 2 groups, state 4, chunks of 4 (7 tokens: two chunks, one padded);
    Delta clamped to (0.05, 0.9), so the limit acts."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    kw = dict(vocab_size=50, hidden_size=16, expand=2, num_heads=4, head_dim=8, n_groups=2,
              state_size=4, chunk_size=4, conv_kernel=3, num_hidden_layers=2,
              time_step_limit=(0.05, 0.9), use_cache=False)
    kw.update(overrides)
    return _build(Mamba2ForCausalLM, Mamba2Config(**kw), seed, None)


def _rms(h: Tensor, eps: float) -> Tensor:
    """h / rms(h) over the last dim, in h's dtype."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def mamba2_forward(model: Any, ids: Tensor) -> Any:
    """Every intermediate the relevance pass reads."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    Bn, T = ids.shape
    D_in, H, P = cfg.expand * cfg.hidden_size, cfg.num_heads, cfg.head_dim
    G, N = cfg.n_groups, cfg.state_size
    h = sd["backbone.embeddings.weight"][ids]
    tape = ra.Tape(layers=[])
    for i in range(cfg.num_hidden_layers):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        L = ra.Tape()
        L.n = ra.rms_norm(h, sd[p + "norm.weight"], cfg.layer_norm_epsilon)
        L.proj = ra.linear(L.n, sd[m + "in_proj.weight"])  # (B, T, 2 D_in + 2GN + H)
        L.z, L.xbc, dt = L.proj.split([D_in, D_in + 2 * G * N, H], -1)
        w = sd[m + "conv1d.weight"]  # (D_in + 2GN, 1, K): depthwise, causal
        L.conv = F.conv1d(L.xbc.transpose(1, 2), w, sd.get(m + "conv1d.bias"),
                          padding=w.shape[-1] - 1, groups=w.shape[0])[..., :T].transpose(1, 2)
        x, Bs, Cs = ra.silu(L.conv).split([D_in, G * N, G * N], -1)
        L.x = x.to(F32).double().view(Bn, T, H, P)  # (the scan runs in float32)
        per_head = H // G
        L.B = Bs.to(F32).double().view(Bn, T, G, N).repeat_interleave(per_head, 2)  # held
        L.C = Cs.to(F32).double().view(Bn, T, G, N).repeat_interleave(per_head, 2)  # held
        delta = F.softplus(dt + sd[m + "dt_bias"]).clamp(*cfg.time_step_limit)  # (B, T, H)
        delta = delta.to(F32).double()
        A = -torch.exp(sd[m + "A_log"].to(F32).double())  # (H,)
        L.decay = torch.exp(delta * A)  # (B, T, H), held
        L.dBx = (delta[..., None, None] * L.x[..., None]) * L.B[:, :, :, None, :]  # (B,T,H,P,N)
        state = torch.zeros(Bn, H, P, N, dtype=torch.float64)
        L.decayed, L.states, ys = [], [], []
        for t in range(T):
            L.decayed.append(L.decay[:, t, :, None, None] * state)
            state = L.decayed[-1] + L.dBx[:, t]
            L.states.append(state)
            ys.append((state * L.C[:, t, :, None, :]).sum(-1))  # (B, H, P)
        L.scan = torch.stack(ys, 1)  # (B, T, H, P)
        L.xD = L.x * sd[m + "D"][:, None]  # (D stays float64, and so does the sum)
        L.s = (L.scan.to(F32).double() + L.xD).reshape(Bn, T, D_in)
        # the gated RMSNorm: y * silu(z), then normalised per group, in float32
        L.g = (L.s.to(F32) * ra.silu(L.z.to(F32))).double()
        gn = _rms(L.g.to(F32).view(Bn, T, G, D_in // G), cfg.layer_norm_epsilon).view(Bn, T, D_in)
        L.y = sd[m + "norm.weight"] * gn.double()
        L.out = ra.linear(L.y, sd[m + "out_proj.weight"])
        L.res = h.to(F32).double() if cfg.residual_in_fp32 else h
        h = L.h_out = L.res + L.out
        tape.layers.append(L)
    tape.nf = ra.rms_norm(h, sd["backbone.norm_f.weight"], cfg.layer_norm_epsilon)
    tape.W_head = sd["lm_head.weight"]
    tape.logits = ra.linear(tape.nf, tape.W_head)
    return tape


def mamba2_relevance(model: Any, ids: Tensor, position: int = -1, token: int = 0) -> Tensor:
    """MambaLRP (module docstring), attnlrp's defaults (epsilon -> 0, sums unstabilised):
    relevance per embedding (B, T, hidden)."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    t = mamba2_forward(model, ids)
    Bn, T = ids.shape
    D_in, H, P = cfg.expand * cfg.hidden_size, cfg.num_heads, cfg.head_dim
    R = ra.start(t.logits, (torch.arange(Bn), torch.full((Bn,), position % T),
                            torch.full((Bn,), token)))
    R = ra.rel_linear(t.nf, t.W_head, t.logits, R, 0.0)  # the final RMSNorm: identity
    for i in reversed(range(cfg.num_hidden_layers)):
        m, L = f"backbone.layers.{i}.mixer.", t.layers[i]
        R_h, R_out = ra.rel_sum([L.res, L.out], L.h_out, R, 0.0)
        R_y = ra.rel_linear(L.y, sd[m + "out_proj.weight"], L.out, R_out, 0.0)
        R_s, R_z = ra.rel_product(R_y)  # gated RMSNorm: identity; y * silu(z) uniform
        R_s = R_s.view(Bn, T, H, P)
        R_scan, R_x = ra.rel_sum([L.scan, L.xD], L.scan + L.xD, R_s, 0.0)  # D: a scale
        R_state = torch.zeros_like(L.states[0])
        R_dBx = torch.zeros_like(L.dBx)
        for step in reversed(range(T)):
            st = L.states[step]
            R_state = R_state + st * L.C[:, step, :, None, :] * ra.safe_div(
                R_scan[:, step], L.scan[:, step])[..., None]  # read out by a held C
            R_prev, R_new = ra.rel_sum([L.decayed[step], L.dBx[:, step]], st, R_state, 0.0)
            R_dBx[:, step] = R_new
            R_state = R_prev  # the held decay passes it on
        R_x = (R_x + R_dBx.sum(-1)).reshape(Bn, T, D_in)  # Delta B held: the copies sum back
        R_conv = torch.cat([R_x, torch.zeros_like(L.conv[..., D_in:])], -1)  # B, C: none; SiLU
        w = sd[m + "conv1d.weight"]  # the causal depthwise conv1d: epsilon -> 0, bias absorbed
        K = w.shape[-1]
        c = F.pad(ra.safe_div(R_conv, L.conv).transpose(1, 2), (0, K - 1))
        # out[t] = sum_k w[k] xbc[t + k - (K - 1)]: xbc[s] reaches out[s + K - 1 - k]
        back = sum(w[None, :, 0, k, None] * c[..., K - 1 - k:K - 1 - k + T] for k in range(K))
        R_xbc = L.xbc * back.transpose(1, 2)
        R_proj = torch.cat([R_z, R_xbc, torch.zeros_like(L.proj[..., -H:])], -1)  # Delta held
        R_n = ra.rel_linear(L.n, sd[m + "in_proj.weight"], L.proj, R_proj, 0.0)
        R = R_h + R_n  # the block's RMSNorm: identity
    return R
