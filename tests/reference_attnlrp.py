"""An explicit, layer-by-layer AttnLRP reference for tiny Hugging Face transformers.

Independent of relprop (nothing is imported from it) and of the Hugging Face
modules' forward: every model is re-implemented from its weights (the state
dict), every intermediate is kept, and relevance goes back rule by rule as
relevance tensors (R per tensor; forward, divide, transpose, multiply), not as
gradients. The rules are those of RULES.md's "Transformers: AttnLRP":

- linear maps y = x W^T + b: epsilon rule, bias absorbed,
  R_x = x * ((R_y / stab(y, epsilon)) @ W);
- sums z = a + b + ...: R_a = a * R_z / stab(z, stabilizer); summands that do
  not depend on the tokens/pixels (position and token-type embeddings,
  additive masks) take their share and it is dropped;
- softmax: R_x = x * (R_s - s * sum_j R_s_j), masked logits get 0;
- bilinear products (Q K^T, A V, silu(g) * u): uniform rule, 0.5 / 0.5;
- LayerNorm: std constant, R_x = x * (u - mean(u)) / std with
  u = gamma * R_y / stab(y, stabilizer); RMSNorm: identity;
- GELU, NewGELU, SiLU, tanh, constant scales, casts: identity; reshapes,
  transposes, splits, concatenations: relevance moves with its entry;
  repeat_kv: the copies' relevance summed back.

Where Hugging Face computes in float32 inside a float64 model (LLaMA's
RMSNorm and RoPE tables; the eager softmax of LLaMA and ViT) the forward here
does the same, so its intermediates equal the model's.

API (all tensors float64):
    tiny_llama(seed=0, attn_implementation="eager", **config) -> LlamaForCausalLM
    tiny_gpt2(seed=0, attn_implementation="eager", **config) -> GPT2LMHeadModel
    tiny_bert(seed=0, attn_implementation="eager", **config) -> BertForSequenceClassification
    tiny_vit(seed=0, attn_implementation="eager", **config) -> ViTForImageClassification
    llama_forward(model, ids) / gpt2_forward / bert_forward(model, ids, attention_mask)
        / vit_forward(model, pixels) -> Tape (every intermediate; tape.logits)
    llama_relevance(model, ids, position=-1, token=0, epsilon=1e-6, stabilizer=1e-6,
                    mask_rule="sum", trace=None) -> (B, T, D)
    gpt2_relevance(same) -> (B, T, D)
    bert_relevance(model, ids, label=0, attention_mask=None, ...) -> (B, T, D)
    vit_relevance(model, pixels, label=0, ...) -> (B, C, H, W)
`trace`: a dict that receives the named relevance tensors of every stage.
`mask_rule`: "sum" (the additive mask is a summand, its share dropped, as a
traced eager `scores + mask`), or "pass" (relevance at the masked logits goes
to the scores unchanged, as inside scaled_dot_product_attention).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

F64 = torch.float64


# --------------------------------------------------------------------------- rules


def stab(z: Tensor, e: float) -> Tensor:
    """z + e * sign(z), sign(0) = +1."""
    return z + e * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def safe_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b, 0 where b == 0."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def rel_linear(x: Tensor, W: Tensor, y: Tensor, R: Tensor, epsilon: float) -> Tensor:
    """Epsilon rule for y = x W^T + b (W: out x in), bias absorbed."""
    return x * ((R / stab(y, epsilon)) @ W)


def rel_conv1d(x: Tensor, W: Tensor, y: Tensor, R: Tensor, epsilon: float) -> Tensor:
    """Epsilon rule for GPT-2's Conv1D y = x @ W + b (W: in x out)."""
    return x * ((R / stab(y, epsilon)) @ W.T)


def rel_sum(parts: list[Tensor], z: Tensor, R: Tensor, stabilizer: float) -> list[Tensor]:
    """Proportional rule for z = sum(parts): each part's share a * R / stab(z)."""
    c = R / stab(z, stabilizer)
    return [a * c for a in parts]


def masked(x: Tensor) -> Tensor:
    """Masked attention logits: -inf or at most finfo.min / 2."""
    return torch.isinf(x) | (x <= torch.finfo(x.dtype).min / 2)


def rel_softmax(x: Tensor, s: Tensor, R: Tensor) -> Tensor:
    """Softmax over the last dim, Taylor at x: R_x = x * (R_s - s * sum_j R_s_j)."""
    m = masked(x)
    xs = torch.where(m, torch.zeros_like(x), x)
    return torch.where(m, torch.zeros_like(x), xs * (R - s * R.sum(-1, keepdim=True)))


def rel_matmul(a: Tensor, b: Tensor, z: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform rule for z = a @ b (batched), z_ij = sum_d a_id b_dj: each product
    term's share a_id b_dj R_ij / z_ij, half to a_id and half to b_dj."""
    c = safe_div(R, z)
    Ra = 0.5 * a * (c @ b.transpose(-1, -2))
    Rb = 0.5 * b * (a.transpose(-1, -2) @ c)
    return Ra, Rb


def rel_product(R: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform rule for the element-wise product a * b: half each."""
    return 0.5 * R, 0.5 * R


def rel_layernorm(x: Tensor, y: Tensor, gamma: Tensor, R: Tensor, ln_eps: float,
                  stabilizer: float) -> Tensor:
    """LayerNorm over the last dim with the std held constant."""
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln_eps)
    u = gamma * (R / stab(y, stabilizer))
    return x * (u - u.mean(-1, keepdim=True)) / std


def layernorm(x: Tensor, gamma: Tensor, beta: Tensor, ln_eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return gamma * (x - mean) / torch.sqrt(var + ln_eps) + beta


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    y = x @ W.T
    return y if b is None else y + b


def softmax(x: Tensor, fp32: bool) -> Tensor:
    if fp32:  # as Hugging Face's eager LLaMA/ViT: softmax(..., dtype=float32).to(dtype)
        return torch.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)
    return torch.softmax(x, dim=-1)


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def new_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def heads(x: Tensor, n: int) -> Tensor:
    """(B, T, n*hd) -> (B, n, T, hd)."""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def merge(x: Tensor) -> Tensor:
    """(B, n, T, hd) -> (B, T, n*hd)."""
    B, n, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, n * hd)


def start(logits: Tensor, index: tuple[Any, ...]) -> Tensor:
    """Relevance at the logits: the target entry's value, everything else 0."""
    R = torch.zeros_like(logits)
    R[index] = logits[index]
    return R


class Tape(dict):
    """Named intermediates; attribute access for convenience."""

    def __getattr__(self, k: str) -> Any:
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e


# --------------------------------------------------------------------------- attention core


def attn_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None,
                 fp32: bool) -> Tape:
    """softmax(q k^T * scale + mask) v with q, k, v (B, H, T, hd); mask additive."""
    kT = k.transpose(-1, -2)
    z = q @ kT
    scores = z * scale
    x = scores if mask is None else scores + mask
    A = softmax(x, fp32)
    out = A @ v
    return Tape(q=q, k=k, kT=kT, v=v, z=z, scores=scores, mask=mask, x=x, A=A, O=out)


def attn_backward(c: Tape, R_O: Tensor, stabilizer: float, mask_rule: str,
                  trace: dict | None, name: str) -> tuple[Tensor, Tensor, Tensor]:
    R_A, R_v = rel_matmul(c.A, c.v, c.O, R_O)
    R_x = rel_softmax(c.x, c.A, R_A)
    if c.mask is None or mask_rule == "pass":
        R_scores = torch.where(masked(c.x), torch.zeros_like(R_x), R_x)
    elif mask_rule == "sum":
        R_scores = rel_sum([c.scores], c.x, R_x, stabilizer)[0]  # the mask's share dropped
    else:
        raise ValueError(mask_rule)
    R_z = R_scores  # the constant scale passes relevance unchanged
    R_q, R_kT = rel_matmul(c.q, c.kT, c.z, R_z)
    if trace is not None:
        trace.update({f"{name}.O": R_O, f"{name}.A": R_A, f"{name}.v": R_v,
                      f"{name}.logits": R_x, f"{name}.z": R_z, f"{name}.q": R_q,
                      f"{name}.k": R_kT.transpose(-1, -2)})
    return R_q, R_kT.transpose(-1, -2), R_v


def causal_mask(T: int) -> Tensor:
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.zeros(T, T, dtype=F64).masked_fill(~allowed, torch.finfo(F64).min)


def padding_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) of 0/1 -> additive (B, 1, 1, T)."""
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=F64).masked_fill(~keep, torch.finfo(F64).min)


def _fp32_softmax(model: Any, family: str) -> bool:
    return model.config._attn_implementation == "eager" and family in ("llama", "vit")


def _randomise(model: Any, seed: int, names: tuple[str, ...]) -> Any:
    """Non-trivial biases and norm weights (HF initialises them to 0 and 1)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
            elif any(s in n for s in names) and n.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


def _build(cls: Any, config: Any, seed: int, attn_implementation: str, norms: tuple[str, ...]):
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn_implementation, dtype=F64)
    return _randomise(model, seed, norms).eval()


# --------------------------------------------------------------------------- LLaMA


def tiny_llama(seed: int = 0, attn_implementation: str = "eager", **overrides: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              use_cache=False, initializer_range=0.2)
    kw.update(overrides)
    return _build(LlamaForCausalLM, LlamaConfig(**kw), seed, attn_implementation, ("norm",))


def rms_norm(h: Tensor, w: Tensor, eps: float) -> Tensor:
    """As LlamaRMSNorm: in float32, back to float64, then the weight."""
    h32 = h.to(torch.float32)
    var = h32.pow(2).mean(-1, keepdim=True)
    return w * (h32 * torch.rsqrt(var + eps)).to(h.dtype)


def rope_tables(cfg: Any, T: int) -> tuple[Tensor, Tensor]:
    """cos, sin (T, hd) as LlamaRotaryEmbedding computes them (default rope, float32)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    assert params.get("rope_type", "default") == "default", params
    base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(F64), emb.sin().to(F64)


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def unrotate_relevance(R: Tensor) -> Tensor:
    """Relevance at rotate_half(x) moved back to x (negation: identity)."""
    h = R.shape[-1] // 2
    return torch.cat((R[..., h:], R[..., :h]), dim=-1)


def rope_forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tape:
    a1 = x * cos
    a2 = rotate_half(x) * sin
    return Tape(x=x, a1=a1, a2=a2, y=a1 + a2)


def rope_backward(c: Tape, R: Tensor, stabilizer: float) -> Tensor:
    R1, R2 = rel_sum([c.a1, c.a2], c.y, R, stabilizer)
    return R1 + unrotate_relevance(R2)  # cos, sin: constant scales


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    return x.repeat_interleave(n_rep, dim=1)


def unrepeat_relevance(R: Tensor, n_rep: int) -> Tensor:
    B, H, T, hd = R.shape
    return R.view(B, H // n_rep, n_rep, T, hd).sum(2)


def _sd(model: Any) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _opt(sd: dict[str, Tensor], key: str) -> Tensor | None:
    return sd.get(key)


def llama_forward(model: Any, ids: Tensor) -> Tape:
    cfg, sd = model.config, _sd(model)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    B, T = ids.shape
    cos, sin = rope_tables(cfg, T)
    mask = causal_mask(T)
    fp32 = _fp32_softmax(model, "llama")
    h = sd["model.embed_tokens.weight"][ids]
    tape = Tape(ids=ids, emb=h, layers=[])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        L = Tape(h_in=h)
        L.n1 = rms_norm(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        for nm in "qkv":
            W, b = sd[p + f"self_attn.{nm}_proj.weight"], _opt(sd, p + f"self_attn.{nm}_proj.bias")
            L[nm + "_lin"] = linear(L.n1, W, b)
        L.rq = rope_forward(heads(L.q_lin, H), cos, sin)
        L.rk = rope_forward(heads(L.k_lin, KV), cos, sin)
        v = heads(L.v_lin, KV)
        L.att = attn_forward(L.rq.y, repeat_kv(L.rk.y, H // KV), repeat_kv(v, H // KV),
                             hd ** -0.5, mask, fp32)
        L.o_in = merge(L.att.O)
        L.o = linear(L.o_in, sd[p + "self_attn.o_proj.weight"],
                     _opt(sd, p + "self_attn.o_proj.bias"))
        L.h_mid = h + L.o
        L.n2 = rms_norm(L.h_mid, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        L.g = linear(L.n2, sd[p + "mlp.gate_proj.weight"], _opt(sd, p + "mlp.gate_proj.bias"))
        L.u = linear(L.n2, sd[p + "mlp.up_proj.weight"], _opt(sd, p + "mlp.up_proj.bias"))
        L.a = silu(L.g)
        L.m = L.a * L.u
        L.mlp = linear(L.m, sd[p + "mlp.down_proj.weight"], _opt(sd, p + "mlp.down_proj.bias"))
        h = L.h_out = L.h_mid + L.mlp
        tape.layers.append(L)
    tape.h = h
    tape.nf = rms_norm(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    W = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    tape.logits = linear(tape.nf, W, _opt(sd, "lm_head.bias"))
    tape.W_head = W
    return tape


def _target(logits: Tensor, position: int, token: Any) -> tuple[Any, ...]:
    B = logits.shape[0]
    tok = torch.as_tensor(token).expand(B) if not isinstance(token, Tensor) or token.dim() == 0 \
        else token
    return (torch.arange(B), torch.full((B,), position % logits.shape[1]), tok.long())


def llama_relevance(model: Any, ids: Tensor, position: int = -1, token: Any = 0,
                    epsilon: float = 1e-6, stabilizer: float = 1e-6, mask_rule: str = "sum",
                    trace: dict | None = None) -> Tensor:
    cfg, sd = model.config, _sd(model)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    t = llama_forward(model, ids)
    tr = trace if trace is not None else {}
    R = start(t.logits, _target(t.logits, position, token))
    tr["logits"] = R
    R = rel_linear(t.nf, t.W_head, t.logits, R, epsilon)
    tr["final_norm.out"] = R  # RMSNorm: identity
    tr["final_norm.in"] = R
    for i in reversed(range(cfg.num_hidden_layers)):
        p, L = f"model.layers.{i}.", t.layers[i]
        tr[f"{i}.out"] = R
        R_mid, R_mlp = rel_sum([L.h_mid, L.mlp], L.h_out, R, stabilizer)
        tr[f"{i}.mlp.out"] = R_mlp
        R_m = rel_linear(L.m, sd[p + "mlp.down_proj.weight"], L.mlp, R_mlp, epsilon)
        tr[f"{i}.mlp.m"] = R_m
        R_a, R_u = rel_product(R_m)
        R_g = R_a  # SiLU: identity
        R_n2 = (rel_linear(L.n2, sd[p + "mlp.gate_proj.weight"], L.g, R_g, epsilon)
                + rel_linear(L.n2, sd[p + "mlp.up_proj.weight"], L.u, R_u, epsilon))
        tr[f"{i}.mlp.in"] = R_n2
        R_mid = R_mid + R_n2  # RMSNorm: identity
        tr[f"{i}.mid"] = R_mid
        R_h, R_o = rel_sum([L.h_in, L.o], L.h_mid, R_mid, stabilizer)
        tr[f"{i}.attn.out"] = R_o
        R_oin = rel_linear(L.o_in, sd[p + "self_attn.o_proj.weight"], L.o, R_o, epsilon)
        R_O = heads(R_oin, H)
        R_qr, R_kr, R_vr = attn_backward(L.att, R_O, stabilizer, mask_rule, tr, f"{i}.attn")
        R_qrope = R_qr
        R_krope = unrepeat_relevance(R_kr, H // KV)
        R_v = unrepeat_relevance(R_vr, H // KV)
        tr[f"{i}.attn.k_rope"], tr[f"{i}.attn.v_heads"] = R_krope, R_v
        R_q = merge(rope_backward(L.rq, R_qrope, stabilizer))
        R_k = merge(rope_backward(L.rk, R_krope, stabilizer))
        R_vm = merge(R_v)
        tr[f"{i}.attn.q_lin"], tr[f"{i}.attn.k_lin"] = R_q, R_k
        R_n1 = sum(rel_linear(L.n1, sd[p + f"self_attn.{nm}_proj.weight"], L[nm + "_lin"], Rx,
                              epsilon) for nm, Rx in zip("qkv", (R_q, R_k, R_vm), strict=True))
        tr[f"{i}.attn.in"] = R_n1
        R = R_h + R_n1  # RMSNorm: identity
        tr[f"{i}.in"] = R
    tr["embedding"] = R
    return R


# --------------------------------------------------------------------------- GPT-2


def tiny_gpt2(seed: int = 0, attn_implementation: str = "eager", **overrides: Any):
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
              initializer_range=0.2, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0)
    kw.update(overrides)
    return _build(GPT2LMHeadModel, GPT2Config(**kw), seed, attn_implementation, ("ln_",))


def gpt2_forward(model: Any, ids: Tensor) -> Tape:
    cfg, sd = model.config, _sd(model)
    H, D = cfg.n_head, cfg.n_embd
    hd = D // H
    B, T = ids.shape
    assert not cfg.scale_attn_by_inverse_layer_idx and not cfg.reorder_and_upcast_attn
    scale = hd ** -0.5 if cfg.scale_attn_weights else 1.0
    act = {"gelu_new": new_gelu, "gelu": gelu}[cfg.activation_function]
    tape = Tape(ids=ids, layers=[])
    tape.wte = sd["transformer.wte.weight"][ids]
    tape.wpe = sd["transformer.wpe.weight"][torch.arange(T)].expand(B, T, D)
    h = tape.h0 = tape.wte + tape.wpe
    mask = causal_mask(T)
    e = cfg.layer_norm_epsilon
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        L = Tape(h_in=h)
        L.n1 = layernorm(h, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], e)
        L.qkv = L.n1 @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = L.qkv.split(D, dim=2)
        L.att = attn_forward(heads(q, H), heads(k, H), heads(v, H), scale, mask, False)
        L.o_in = merge(L.att.O)
        L.o = L.o_in @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        L.h_mid = h + L.o
        L.n2 = layernorm(L.h_mid, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], e)
        L.f = L.n2 @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"]
        L.a = act(L.f)
        L.mlp = L.a @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
        h = L.h_out = L.h_mid + L.mlp
        tape.layers.append(L)
    tape.h = h
    tape.nf = layernorm(h, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], e)
    tape.W_head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    tape.logits = linear(tape.nf, tape.W_head)
    return tape


def gpt2_relevance(model: Any, ids: Tensor, position: int = -1, token: Any = 0,
                   epsilon: float = 1e-6, stabilizer: float = 1e-6, mask_rule: str = "sum",
                   trace: dict | None = None) -> Tensor:
    cfg, sd = model.config, _sd(model)
    H = cfg.n_head
    e = cfg.layer_norm_epsilon
    t = gpt2_forward(model, ids)
    tr = trace if trace is not None else {}
    R = start(t.logits, _target(t.logits, position, token))
    tr["logits"] = R
    R = rel_linear(t.nf, t.W_head, t.logits, R, epsilon)
    tr["ln_f.out"] = R
    R = rel_layernorm(t.h, t.nf, sd["transformer.ln_f.weight"], R, e, stabilizer)
    for i in reversed(range(cfg.n_layer)):
        p, L = f"transformer.h.{i}.", t.layers[i]
        tr[f"{i}.out"] = R
        R_mid, R_mlp = rel_sum([L.h_mid, L.mlp], L.h_out, R, stabilizer)
        R_a = rel_conv1d(L.a, sd[p + "mlp.c_proj.weight"], L.mlp, R_mlp, epsilon)
        R_f = R_a  # NewGELU: identity
        R_n2 = rel_conv1d(L.n2, sd[p + "mlp.c_fc.weight"], L.f, R_f, epsilon)
        R_mid = R_mid + rel_layernorm(L.h_mid, L.n2, sd[p + "ln_2.weight"], R_n2, e, stabilizer)
        tr[f"{i}.mid"] = R_mid
        R_h, R_o = rel_sum([L.h_in, L.o], L.h_mid, R_mid, stabilizer)
        R_oin = rel_conv1d(L.o_in, sd[p + "attn.c_proj.weight"], L.o, R_o, epsilon)
        R_q, R_k, R_v = attn_backward(L.att, heads(R_oin, H), stabilizer, mask_rule, tr,
                                      f"{i}.attn")
        R_qkv = torch.cat([merge(R_q), merge(R_k), merge(R_v)], dim=2)
        R_n1 = rel_conv1d(L.n1, sd[p + "attn.c_attn.weight"], L.qkv, R_qkv, epsilon)
        R = R_h + rel_layernorm(L.h_in, L.n1, sd[p + "ln_1.weight"], R_n1, e, stabilizer)
        tr[f"{i}.in"] = R
    tr["h0"] = R
    R = rel_sum([t.wte, t.wpe], t.h0, R, stabilizer)[0]  # position embeddings absorbed
    tr["embedding"] = R
    return R


# --------------------------------------------------------------------------- BERT


def tiny_bert(seed: int = 0, attn_implementation: str = "eager", **overrides: Any):
    from transformers import BertConfig, BertForSequenceClassification

    kw = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    kw.update(overrides)
    return _build(BertForSequenceClassification, BertConfig(**kw), seed, attn_implementation,
                  ("LayerNorm",))


def bert_forward(model: Any, ids: Tensor, attention_mask: Tensor | None = None) -> Tape:
    cfg, sd = model.config, _sd(model)
    H, D = cfg.num_attention_heads, cfg.hidden_size
    hd = D // H
    B, T = ids.shape
    assert getattr(cfg, "position_embedding_type", "absolute") == "absolute"
    act = {"gelu": gelu, "gelu_new": new_gelu}[cfg.hidden_act]
    e = cfg.layer_norm_eps
    tape = Tape(ids=ids, layers=[])
    tape.word = sd["bert.embeddings.word_embeddings.weight"][ids]
    tape.tok = sd["bert.embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)]
    tape.pos = sd["bert.embeddings.position_embeddings.weight"][torch.arange(T)].expand(B, T, D)
    tape.e_sum = tape.word + tape.tok + tape.pos
    pe = "bert.embeddings.LayerNorm."
    h = tape.e_ln = layernorm(tape.e_sum, sd[pe + "weight"], sd[pe + "bias"], e)
    mask = None if attention_mask is None else padding_mask(attention_mask)
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        L = Tape(h_in=h)
        for nm in ("query", "key", "value"):
            L[nm] = linear(h, sd[p + f"attention.self.{nm}.weight"],
                           sd[p + f"attention.self.{nm}.bias"])
        L.att = attn_forward(heads(L.query, H), heads(L.key, H), heads(L.value, H), hd ** -0.5,
                             mask, False)
        L.o_in = merge(L.att.O)
        L.o = linear(L.o_in, sd[p + "attention.output.dense.weight"],
                     sd[p + "attention.output.dense.bias"])
        L.s1 = L.o + h
        q = p + "attention.output.LayerNorm."
        L.h_mid = layernorm(L.s1, sd[q + "weight"], sd[q + "bias"], e)
        L.f = linear(L.h_mid, sd[p + "intermediate.dense.weight"],
                     sd[p + "intermediate.dense.bias"])
        L.a = act(L.f)
        L.mlp = linear(L.a, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
        L.s2 = L.mlp + L.h_mid
        q = p + "output.LayerNorm."
        h = L.h_out = layernorm(L.s2, sd[q + "weight"], sd[q + "bias"], e)
        tape.layers.append(L)
    tape.h = h
    tape.cls = h[:, 0]
    tape.pd = linear(tape.cls, sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"])
    tape.pooled = torch.tanh(tape.pd)
    tape.logits = linear(tape.pooled, sd["classifier.weight"], sd["classifier.bias"])
    return tape


def bert_relevance(model: Any, ids: Tensor, label: Any = 0, attention_mask: Tensor | None = None,
                   epsilon: float = 1e-6, stabilizer: float = 1e-6, mask_rule: str = "sum",
                   trace: dict | None = None) -> Tensor:
    cfg, sd = model.config, _sd(model)
    H, e = cfg.num_attention_heads, cfg.layer_norm_eps
    t = bert_forward(model, ids, attention_mask)
    tr = trace if trace is not None else {}
    B = ids.shape[0]
    lab = torch.as_tensor(label).long().expand(B)
    R = start(t.logits, (torch.arange(B), lab))
    tr["logits"] = R
    R = rel_linear(t.pooled, sd["classifier.weight"], t.logits, R, epsilon)
    tr["pooled"] = R  # tanh: identity
    R = rel_linear(t.cls, sd["bert.pooler.dense.weight"], t.pd, R, epsilon)
    tr["cls"] = R
    R_h = torch.zeros_like(t.h)
    R_h[:, 0] = R
    R = R_h
    for i in reversed(range(cfg.num_hidden_layers)):
        p, L = f"bert.encoder.layer.{i}.", t.layers[i]
        tr[f"{i}.out"] = R
        R_s2 = rel_layernorm(L.s2, L.h_out, sd[p + "output.LayerNorm.weight"], R, e, stabilizer)
        R_mlp, R_mid = rel_sum([L.mlp, L.h_mid], L.s2, R_s2, stabilizer)
        R_a = rel_linear(L.a, sd[p + "output.dense.weight"], L.mlp, R_mlp, epsilon)
        R_mid = R_mid + rel_linear(L.h_mid, sd[p + "intermediate.dense.weight"], L.f, R_a, epsilon)
        tr[f"{i}.mid"] = R_mid
        R_s1 = rel_layernorm(L.s1, L.h_mid, sd[p + "attention.output.LayerNorm.weight"], R_mid, e,
                             stabilizer)
        R_o, R_h = rel_sum([L.o, L.h_in], L.s1, R_s1, stabilizer)
        R_oin = rel_linear(L.o_in, sd[p + "attention.output.dense.weight"], L.o, R_o, epsilon)
        R_q, R_k, R_v = attn_backward(L.att, heads(R_oin, H), stabilizer, mask_rule, tr,
                                      f"{i}.attn")
        for nm, Rx in zip(("query", "key", "value"), (R_q, R_k, R_v), strict=True):
            R_h = R_h + rel_linear(L.h_in, sd[p + f"attention.self.{nm}.weight"], L[nm],
                                   merge(Rx), epsilon)
        R = R_h
        tr[f"{i}.in"] = R
    pe = "bert.embeddings.LayerNorm."
    R = rel_layernorm(t.e_sum, t.e_ln, sd[pe + "weight"], R, e, stabilizer)
    tr["e_sum"] = R
    R = rel_sum([t.word, t.tok, t.pos], t.e_sum, R, stabilizer)[0]  # token type, position absorbed
    tr["embedding"] = R
    return R


# --------------------------------------------------------------------------- ViT


def tiny_vit(seed: int = 0, attn_implementation: str = "eager", **overrides: Any):
    from transformers import ViTConfig, ViTForImageClassification

    kw = dict(image_size=16, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2, num_labels=3,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    model = _build(ViTForImageClassification, ViTConfig(**kw), seed, attn_implementation,
                   ("layernorm",))
    g = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():  # HF initialises the CLS token to 0 in some versions
        emb = model.vit.embeddings
        emb.cls_token.copy_(0.2 * torch.randn(emb.cls_token.shape, generator=g, dtype=F64))
        emb.position_embeddings.copy_(
            0.2 * torch.randn(emb.position_embeddings.shape, generator=g, dtype=F64))
    return model


def vit_forward(model: Any, pixels: Tensor) -> Tape:
    cfg, sd = model.config, _sd(model)
    H, D, P = cfg.num_attention_heads, cfg.hidden_size, cfg.patch_size
    hd = D // H
    B, C, Hh, Ww = pixels.shape
    act = {"gelu": gelu, "gelu_new": new_gelu}[cfg.hidden_act]
    e = cfg.layer_norm_eps
    tape = Tape(pixels=pixels, layers=[])
    # the patch convolution (kernel = stride = P) as unfold + matmul
    tape.cols = F.unfold(pixels, kernel_size=P, stride=P).transpose(1, 2)  # (B, N, C*P*P)
    tape.W_patch = sd["vit.embeddings.patch_embeddings.projection.weight"].reshape(D, -1)
    tape.patches = linear(tape.cols, tape.W_patch,
                          sd["vit.embeddings.patch_embeddings.projection.bias"])
    cls = sd["vit.embeddings.cls_token"].expand(B, 1, D)
    tape.tokens = torch.cat([cls, tape.patches], dim=1)
    tape.pos = sd["vit.embeddings.position_embeddings"].expand(B, -1, D)
    h = tape.h0 = tape.tokens + tape.pos
    fp32 = _fp32_softmax(model, "vit")
    for i in range(cfg.num_hidden_layers):
        p = f"vit.layers.{i}."
        L = Tape(h_in=h)
        L.n1 = layernorm(h, sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"], e)
        for nm in ("q_proj", "k_proj", "v_proj"):
            L[nm] = linear(L.n1, sd[p + f"attention.{nm}.weight"],
                           sd.get(p + f"attention.{nm}.bias"))
        L.att = attn_forward(heads(L.q_proj, H), heads(L.k_proj, H), heads(L.v_proj, H), hd ** -0.5,
                             None, fp32)
        L.o_in = merge(L.att.O)
        L.o = linear(L.o_in, sd[p + "attention.o_proj.weight"],
                     sd[p + "attention.o_proj.bias"])
        L.h_mid = L.o + h
        L.n2 = layernorm(L.h_mid, sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"],
                         e)
        L.f = linear(L.n2, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        L.a = act(L.f)
        L.mlp = linear(L.a, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = L.h_out = L.mlp + L.h_mid
        tape.layers.append(L)
    tape.h = h
    tape.nf = layernorm(h, sd["vit.layernorm.weight"], sd["vit.layernorm.bias"], e)
    tape.cls_out = tape.nf[:, 0]
    tape.logits = linear(tape.cls_out, sd["classifier.weight"], sd["classifier.bias"])
    return tape


def vit_relevance(model: Any, pixels: Tensor, label: Any = 0, epsilon: float = 1e-6,
                  stabilizer: float = 1e-6, trace: dict | None = None) -> Tensor:
    cfg, sd = model.config, _sd(model)
    H, e, P = cfg.num_attention_heads, cfg.layer_norm_eps, cfg.patch_size
    t = vit_forward(model, pixels)
    tr = trace if trace is not None else {}
    B = pixels.shape[0]
    lab = torch.as_tensor(label).long().expand(B)
    R = start(t.logits, (torch.arange(B), lab))
    tr["logits"] = R
    R_cls = rel_linear(t.cls_out, sd["classifier.weight"], t.logits, R, epsilon)
    R = torch.zeros_like(t.nf)
    R[:, 0] = R_cls
    tr["layernorm.out"] = R
    R = rel_layernorm(t.h, t.nf, sd["vit.layernorm.weight"], R, e, stabilizer)
    for i in reversed(range(cfg.num_hidden_layers)):
        p, L = f"vit.layers.{i}.", t.layers[i]
        tr[f"{i}.out"] = R
        R_mlp, R_mid = rel_sum([L.mlp, L.h_mid], L.h_out, R, stabilizer)
        R_a = rel_linear(L.a, sd[p + "mlp.fc2.weight"], L.mlp, R_mlp, epsilon)
        R_n2 = rel_linear(L.n2, sd[p + "mlp.fc1.weight"], L.f, R_a, epsilon)
        R_mid = R_mid + rel_layernorm(L.h_mid, L.n2, sd[p + "layernorm_after.weight"], R_n2, e,
                                      stabilizer)
        tr[f"{i}.mid"] = R_mid
        R_o, R_h = rel_sum([L.o, L.h_in], L.h_mid, R_mid, stabilizer)
        R_oin = rel_linear(L.o_in, sd[p + "attention.o_proj.weight"], L.o, R_o, epsilon)
        R_q, R_k, R_v = attn_backward(L.att, heads(R_oin, H), stabilizer, "pass", tr, f"{i}.attn")
        R_n1 = sum(rel_linear(L.n1, sd[p + f"attention.{nm}.weight"], L[nm], merge(Rx),
                              epsilon)
                   for nm, Rx in zip(("q_proj", "k_proj", "v_proj"), (R_q, R_k, R_v), strict=True))
        R = R_h + rel_layernorm(L.h_in, L.n1, sd[p + "layernorm_before.weight"], R_n1, e,
                                stabilizer)
        tr[f"{i}.in"] = R
    tr["h0"] = R
    R_tokens = rel_sum([t.tokens], t.h0, R, stabilizer)[0]  # position embeddings absorbed
    R_patches = R_tokens[:, 1:]  # the CLS token is a constant: its relevance is dropped
    tr["patches"] = R_patches
    R_cols = rel_linear(t.cols, t.W_patch, t.patches, R_patches, epsilon)
    R_px = F.fold(R_cols.transpose(1, 2), output_size=pixels.shape[-2:], kernel_size=P, stride=P)
    tr["pixels"] = R_px
    return R_px
