"""Tiny random transformer families (issue 19) built offline from their config classes,
and explicit layer-by-layer AttnLRP references for the ones whose rules go beyond
tests/reference_attnlrp.py (mixture-of-experts, encoder-decoders, CLIP, Mamba).

Like tests/reference_attnlrp.py, each reference rebuilds the model from its state dict
and sends relevance back rule by rule as relevance tensors (R per tensor), sharing no
code with relprop or with the Hugging Face modules' forward; the rules are AttnLRP's
(reference_attnlrp's docstring) plus those issue 19 adds:

- casts (`type_as`, `.to(dtype)`): identity;
- a mixture-of-experts layer: the router's choice (top-k) and its routing weights
  (renormalised or not) are held constant, so each chosen expert's output takes its
  share of the weighted sum in proportion to it (the weights being constant scales);
- T5's RMSNorm: identity; its relative position bias: a constant summand of the scores;
- CLIP's L2 normalisation: the norm held constant; pooling at the end-of-sequence
  token: the pooled row's relevance goes back to that token;
- Mamba's selective scan: the input-dependent Delta, A, B and C held constant, so the
  scan is linear in its input; SiLU identity; the gate y * silu(z) uniform.

Every model is float64 unless a test says otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

F64 = torch.float64

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             use_cache=False, initializer_range=0.2)


def _build(cls: Any, config: Any, seed: int, attn_implementation: str | None) -> Any:
    torch.manual_seed(seed)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = cls._from_config(config, dtype=F64, **kw)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # non-trivial norm weights and biases (HF starts them at 1 and 0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return model.eval()


# --------------------------------------------------------------------------- Gemma


def tiny_gemma2(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = {**SMALL, "head_dim": 8, "sliding_window": 4, **overrides}
    return _build(Gemma2ForCausalLM, Gemma2Config(**kw), seed, attn_implementation)


def tiny_gemma3(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = {**SMALL, "head_dim": 8, "sliding_window": 4, **overrides}
    return _build(Gemma3ForCausalLM, Gemma3TextConfig(**kw), seed, attn_implementation)


# --------------------------------------------------------------------------- encoder-decoders


def tiny_t5(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    kw = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16,
              use_cache=False, decoder_start_token_id=0, dropout_rate=0.0,
              initializer_factor=1.0)
    kw.update(overrides)
    return _build(T5ForConditionalGeneration, T5Config(**kw), seed, attn_implementation)


def tiny_whisper(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    kw = dict(vocab_size=50, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
              decoder_ffn_dim=64, d_model=32, max_source_positions=8,
              max_target_positions=16, use_cache=False, decoder_start_token_id=1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return _build(WhisperForConditionalGeneration, WhisperConfig(**kw), seed,
                  attn_implementation)


# --------------------------------------------------------------------------- BLOOM


def tiny_bloom(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import BloomConfig, BloomForCausalLM

    kw = dict(vocab_size=50, hidden_size=32, n_layer=2, n_head=4, use_cache=False,
              initializer_range=0.2, hidden_dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    return _build(BloomForCausalLM, BloomConfig(**kw), seed, attn_implementation)


# --------------------------------------------------------------------------- CLIP


def tiny_clip(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    """A CLIPModel: text tower (end-of-sequence token 3, padding 1) and vision tower
    (16 x 16 pixels, 8 x 8 patches)."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)
    text = dict(tower, vocab_size=50, max_position_embeddings=16, bos_token_id=0,
                eos_token_id=3, pad_token_id=1)
    vision = dict(tower, image_size=16, patch_size=8, num_channels=3)
    kw = dict(text_config=text, vision_config=vision, projection_dim=16, **overrides)
    return _build(CLIPModel, CLIPConfig(**kw), seed, attn_implementation)


def _clip_encoder(sd: dict[str, Tensor], prefix: str, cfg: Any, h: Tensor,
                  mask: Tensor | None, fp32: bool) -> tuple[Tensor, list[Any]]:
    """CLIP's pre-LayerNorm encoder: h + attn(ln1(h)), then h + mlp(ln2(h)); quick GELU."""
    ra = _ra()
    H, e = cfg.num_attention_heads, cfg.layer_norm_eps
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"{prefix}.encoder.layers.{i}."
        L = ra.Tape(h_in=h)
        L.ln1 = ra.layernorm(h, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], e)
        for nm in ("q", "k", "v"):
            L[nm] = ra.linear(L.ln1, sd[p + f"self_attn.{nm}_proj.weight"],
                              sd[p + f"self_attn.{nm}_proj.bias"])
        L.att = ra.attn_forward(ra.heads(L.q, H), ra.heads(L.k, H), ra.heads(L.v, H),
                                (cfg.hidden_size // H) ** -0.5, mask, fp32)
        L.o_in = ra.merge(L.att.O)
        L.o = ra.linear(L.o_in, sd[p + "self_attn.out_proj.weight"],
                        sd[p + "self_attn.out_proj.bias"])
        L.s1 = h + L.o
        L.ln2 = ra.layernorm(L.s1, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], e)
        L.f = ra.linear(L.ln2, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        L.a = L.f * torch.sigmoid(1.702 * L.f)
        L.mlp = ra.linear(L.a, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = L.s2 = L.s1 + L.mlp
        layers.append(L)
    return h, layers


def _clip_encoder_relevance(sd: dict[str, Tensor], prefix: str, cfg: Any, layers: list[Any],
                            R: Tensor, epsilon: float, stabilizer: float) -> Tensor:
    ra = _ra()
    H, e = cfg.num_attention_heads, cfg.layer_norm_eps
    for i in reversed(range(cfg.num_hidden_layers)):
        p, L = f"{prefix}.encoder.layers.{i}.", layers[i]
        R_s1, R_mlp = ra.rel_sum([L.s1, L.mlp], L.s2, R, stabilizer)
        R_a = ra.rel_linear(L.a, sd[p + "mlp.fc2.weight"], L.mlp, R_mlp, epsilon)  # GELU: id
        R_ln2 = ra.rel_linear(L.ln2, sd[p + "mlp.fc1.weight"], L.f, R_a, epsilon)
        R_s1 = R_s1 + ra.rel_layernorm(L.s1, L.ln2, sd[p + "layer_norm2.weight"], R_ln2, e,
                                       stabilizer)
        R_h, R_o = ra.rel_sum([L.h_in, L.o], L.s1, R_s1, stabilizer)
        R_oin = ra.rel_linear(L.o_in, sd[p + "self_attn.out_proj.weight"], L.o, R_o, epsilon)
        R_q, R_k, R_v = ra.attn_backward(L.att, ra.heads(R_oin, H), stabilizer, "pass", None,
                                         f"{i}.attn")
        R_ln1 = sum(ra.rel_linear(L.ln1, sd[p + f"self_attn.{nm}_proj.weight"], L[nm],
                                  ra.merge(Rx), epsilon)
                    for nm, Rx in zip(("q", "k", "v"), (R_q, R_k, R_v), strict=True))
        R = R_h + ra.rel_layernorm(L.h_in, L.ln1, sd[p + "layer_norm1.weight"], R_ln1, e,
                                   stabilizer)
    return R


def clip_image_embeds(model: Any, pixels: Tensor) -> Tensor:
    """The vision tower's L2-normalised projection (a constant when text is explained)."""
    ra, cfg, sd = _ra(), model.config.vision_config, _sd(model)
    fp32 = model.config._attn_implementation == "eager"
    P = "vision_model"
    patches = torch.nn.functional.conv2d(pixels, sd[f"{P}.embeddings.patch_embedding.weight"],
                                         stride=cfg.patch_size).flatten(2).transpose(1, 2)
    cls = sd[f"{P}.embeddings.class_embedding"].expand(pixels.shape[0], 1, -1)
    h = torch.cat([cls, patches], 1) + sd[f"{P}.embeddings.position_embedding.weight"]
    e = cfg.layer_norm_eps
    h = ra.layernorm(h, sd[f"{P}.pre_layrnorm.weight"], sd[f"{P}.pre_layrnorm.bias"], e)
    h, _ = _clip_encoder(sd, P, cfg, h, None, fp32)
    pooled = ra.layernorm(h[:, 0], sd[f"{P}.post_layernorm.weight"],
                          sd[f"{P}.post_layernorm.bias"], e)
    embeds = ra.linear(pooled, sd["visual_projection.weight"])
    return embeds / embeds.pow(2).sum(-1, keepdim=True).sqrt()


def clip_text_forward(model: Any, ids: Tensor, pixels: Tensor,
                      attention_mask: Tensor | None = None) -> Any:
    """Every intermediate of the text tower up to logits_per_text (B_text, B_image)."""
    ra, cfg, sd = _ra(), model.config.text_config, _sd(model)
    fp32 = model.config._attn_implementation == "eager"
    B, T = ids.shape
    P = "text_model"
    t = ra.Tape(ids=ids)
    t.word = sd[f"{P}.embeddings.token_embedding.weight"][ids]
    t.pos = sd[f"{P}.embeddings.position_embedding.weight"][:T].expand(B, T, -1)
    t.emb = t.word + t.pos
    blocked = ~torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        blocked = blocked | ~attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(blocked.shape, dtype=F64).masked_fill(blocked, torch.finfo(F64).min)
    t.h, t.layers = _clip_encoder(sd, P, cfg, t.emb, mask, fp32)
    e = cfg.layer_norm_eps
    t.final = ra.layernorm(t.h, sd[f"{P}.final_layer_norm.weight"],
                           sd[f"{P}.final_layer_norm.bias"], e)
    t.eos = (ids == cfg.eos_token_id).int().argmax(-1)  # the first end-of-sequence token
    t.pooled = t.final[torch.arange(B), t.eos]
    t.embeds = ra.linear(t.pooled, sd["text_projection.weight"])
    t.norm = t.embeds.pow(2).sum(-1, keepdim=True).sqrt()
    t.normed = t.embeds / t.norm
    t.scale = sd["logit_scale"].exp()
    t.image = clip_image_embeds(model, pixels)
    t.logits = t.scale * (t.normed @ t.image.T)
    return t


def clip_text_relevance(model: Any, ids: Tensor, pixels: Tensor, image: int = 0,
                        attention_mask: Tensor | None = None, epsilon: float = 1e-6,
                        stabilizer: float = 1e-6) -> Tensor:
    """Relevance (B, T, D) at the token embeddings of logits_per_text[:, image].

    The similarity is linear in the normalised text embedding (the image side is a
    constant); the norm is held constant, so the division passes relevance unchanged;
    the pooled row's relevance goes back to the end-of-sequence token."""
    ra, cfg, sd = _ra(), model.config.text_config, _sd(model)
    t = clip_text_forward(model, ids, pixels, attention_mask)
    B = ids.shape[0]
    R = ra.start(t.logits, (torch.arange(B), image))
    R_normed = t.normed * (ra.safe_div(R, t.logits) @ (t.scale * t.image))
    R_embeds = R_normed  # / norm, the norm held constant
    R_pooled = ra.rel_linear(t.pooled, sd["text_projection.weight"], t.embeds, R_embeds,
                             epsilon)
    R = torch.zeros_like(t.final)
    R[torch.arange(B), t.eos] = R_pooled
    P = "text_model"
    R = ra.rel_layernorm(t.h, t.final, sd[f"{P}.final_layer_norm.weight"], R,
                         cfg.layer_norm_eps, stabilizer)
    R = _clip_encoder_relevance(sd, P, cfg, t.layers, R, epsilon, stabilizer)
    return ra.rel_sum([t.word, t.pos], t.emb, R, stabilizer)[0]  # the position's share dropped


def _ra() -> Any:
    import reference_attnlrp

    return reference_attnlrp


def _sd(model: Any) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- Mixtral (MoE)


def tiny_mixtral(seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any) -> Any:
    """4 experts, 2 per token (transformers' default grouped_mm expert path)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kw = {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2,
          "router_jitter_noise": 0.0, **overrides}
    return _build(MixtralForCausalLM, MixtralConfig(**kw), seed, attn_implementation)


def tiny_qwen3_moe(seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw = {**SMALL, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 16, "norm_topk_prob": True, **overrides}
    return _build(Qwen3MoeForCausalLM, Qwen3MoeConfig(**kw), seed, attn_implementation)


def moe_forward(sd: dict[str, Tensor], p: str, x: Tensor, top_k: int) -> Any:
    """Mixtral's sparse MoE block on x (B, T, D): a float32 softmax router, its top k
    renormalised, each chosen expert down(silu(gate) * up) weighted and summed."""
    ra = _ra()
    B, T, D = x.shape
    flat = x.reshape(-1, D)
    probs = torch.softmax(ra.linear(flat, sd[p + "gate.weight"]).float(), -1)
    w, idx = torch.topk(probs, top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    m = ra.Tape(x=flat, idx=idx, w=w, experts=[])
    for j in range(top_k):  # the j-th choice of every token
        gate_up, down = sd[p + "experts.gate_up_proj"][idx[:, j]], \
            sd[p + "experts.down_proj"][idx[:, j]]
        e = ra.Tape(gate_up=gate_up, down=down)
        e.gu = torch.einsum("nd,nod->no", flat, gate_up)
        e.g, e.u = e.gu.chunk(2, -1)
        e.a = ra.silu(e.g) * e.u
        e.y = torch.einsum("ni,ndi->nd", e.a, down)
        e.yw = e.y * w[:, j, None]
        m.experts.append(e)
    m.out = sum(e.yw for e in m.experts)
    m.y = m.out.reshape(B, T, D)
    return m


def moe_relevance(m: Any, R: Tensor, stabilizer: float) -> Tensor:
    """The routing weights held constant: each chosen expert's weighted output takes its
    share of the sum, the weight passes it unchanged; experts: LRP-0 (attnlrp, epsilon
    -> 0), the gate uniform, SiLU identity; each copy of a token sums back."""
    ra = _ra()
    B, T, D = R.shape
    shares = ra.rel_sum([e.yw for e in m.experts], m.out, R.reshape(-1, D), stabilizer)
    R_x = torch.zeros_like(m.x)
    for e, R_yw in zip(m.experts, shares, strict=True):
        R_a = e.a * torch.einsum("nd,ndi->ni", ra.safe_div(R_yw, e.y), e.down)
        R_g, R_u = ra.rel_product(R_a)
        R_gu = torch.cat([R_g, R_u], -1)
        R_x = R_x + m.x * torch.einsum("no,nod->nd", ra.safe_div(R_gu, e.gu), e.gate_up)
    return R_x.reshape(B, T, D)


def mixtral_forward(model: Any, ids: Tensor) -> Any:
    """LLaMA's decoder (tests/reference_attnlrp.py) with the MoE block as its MLP."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    B, T = ids.shape
    cos, sin = ra.rope_tables(cfg, T)
    mask = ra.causal_mask(T)
    fp32 = model.config._attn_implementation == "eager"
    h = sd["model.embed_tokens.weight"][ids]
    tape = ra.Tape(ids=ids, emb=h, layers=[])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        L = ra.Tape(h_in=h)
        L.n1 = ra.rms_norm(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        for nm in "qkv":
            L[nm + "_lin"] = ra.linear(L.n1, sd[p + f"self_attn.{nm}_proj.weight"])
        L.rq = ra.rope_forward(ra.heads(L.q_lin, H), cos, sin)
        L.rk = ra.rope_forward(ra.heads(L.k_lin, KV), cos, sin)
        v = ra.heads(L.v_lin, KV)
        L.att = ra.attn_forward(L.rq.y, ra.repeat_kv(L.rk.y, H // KV),
                                ra.repeat_kv(v, H // KV), hd ** -0.5, mask, fp32)
        L.o_in = ra.merge(L.att.O)
        L.o = ra.linear(L.o_in, sd[p + "self_attn.o_proj.weight"])
        L.h_mid = h + L.o
        L.n2 = ra.rms_norm(L.h_mid, sd[p + "post_attention_layernorm.weight"],
                           cfg.rms_norm_eps)
        L.moe = moe_forward(sd, p + "mlp.", L.n2, cfg.num_experts_per_tok)
        h = L.h_out = L.h_mid + L.moe.y
        tape.layers.append(L)
    tape.nf = ra.rms_norm(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    tape.W_head = sd["lm_head.weight"]
    tape.logits = ra.linear(tape.nf, tape.W_head)
    return tape


def mixtral_relevance(model: Any, ids: Tensor, position: int = -1, token: int = 0,
                      epsilon: float = 0.0, stabilizer: float = 0.0) -> Tensor:
    """Relevance (B, T, D) at the token embeddings of the logit of `token` at `position`."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    t = mixtral_forward(model, ids)
    B = ids.shape[0]
    R = ra.start(t.logits, (torch.arange(B), torch.full((B,), position % ids.shape[1]),
                            torch.full((B,), token)))
    R = ra.rel_linear(t.nf, t.W_head, t.logits, R, epsilon)  # RMSNorm: identity
    for i in reversed(range(cfg.num_hidden_layers)):
        p, L = f"model.layers.{i}.", t.layers[i]
        R_mid, R_moe = ra.rel_sum([L.h_mid, L.moe.y], L.h_out, R, stabilizer)
        R_mid = R_mid + moe_relevance(L.moe, R_moe, stabilizer)  # RMSNorm: identity
        R_h, R_o = ra.rel_sum([L.h_in, L.o], L.h_mid, R_mid, stabilizer)
        R_oin = ra.rel_linear(L.o_in, sd[p + "self_attn.o_proj.weight"], L.o, R_o, epsilon)
        R_qr, R_kr, R_vr = ra.attn_backward(L.att, ra.heads(R_oin, H), stabilizer, "pass",
                                            None, f"{i}.attn")
        R_q = ra.merge(ra.rope_backward(L.rq, R_qr, stabilizer))
        R_k = ra.merge(ra.rope_backward(L.rk, ra.unrepeat_relevance(R_kr, H // KV),
                                        stabilizer))
        R_v = ra.merge(ra.unrepeat_relevance(R_vr, H // KV))
        R_n1 = sum(ra.rel_linear(L.n1, sd[p + f"self_attn.{nm}_proj.weight"], L[nm + "_lin"],
                                 Rx, epsilon) for nm, Rx in zip("qkv", (R_q, R_k, R_v),
                                                                strict=True))
        R = R_h + R_n1  # RMSNorm: identity
    return R


# --------------------------------------------------------------------------- Mamba (MambaLRP)


def tiny_mamba(seed: int = 0, **overrides: Any) -> Any:
    """Mamba's pure-PyTorch path (no CUDA kernels): the sequential selective scan."""
    from transformers import MambaConfig, MambaForCausalLM

    kw = dict(vocab_size=50, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
              conv_kernel=3, time_step_rank=4, use_cache=False, use_mambapy=False)
    kw.update(overrides)
    return _build(MambaForCausalLM, MambaConfig(**kw), seed, None)


def mamba_forward(model: Any, ids: Tensor) -> Any:
    """Every intermediate, with the model's float32 casts (RMSNorm, B and u in the scan,
    the residual when `residual_in_fp32`)."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    B, T = ids.shape
    h = sd["backbone.embeddings.weight"][ids]
    tape = ra.Tape(ids=ids, emb=h, layers=[])
    for i in range(cfg.num_hidden_layers):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        L = ra.Tape(h_in=h)
        L.n = ra.rms_norm(h, sd[p + "norm.weight"], cfg.layer_norm_epsilon)
        L.proj = ra.linear(L.n, sd[m + "in_proj.weight"]).transpose(1, 2)  # (B, 2I, T)
        L.xs, L.z = L.proj.chunk(2, 1)
        w = sd[m + "conv1d.weight"]  # (I, 1, K)
        L.conv = torch.nn.functional.conv1d(L.xs, w, sd[m + "conv1d.bias"],
                                            padding=w.shape[-1] - 1, groups=w.shape[0])[..., :T]
        L.u = ra.silu(L.conv)  # (B, I, T)
        dt, Bs, Cs = ra.linear(L.u.transpose(1, 2), sd[m + "x_proj.weight"]).split(
            [cfg.time_step_rank, cfg.state_size, cfg.state_size], -1)
        delta = torch.nn.functional.softplus(sd[m + "dt_proj.weight"] @ dt.transpose(1, 2)
                                             + sd[m + "dt_proj.bias"].float()[:, None])  # (B, I, T)
        A = -torch.exp(sd[m + "A_log"].float())  # (I, N)
        L.dA = torch.exp(A[None, :, None, :] * delta[..., None])  # (B, I, T, N), held
        L.dB = delta[..., None] * Bs[:, None].float()  # held
        L.dBu = L.dB * L.u[..., None].float()
        L.C = Cs  # (B, T, N), held
        state = torch.zeros(B, L.u.shape[1], cfg.state_size, dtype=F64)
        L.prev, L.decayed, L.states, ys = [], [], [], []
        for t in range(T):
            L.prev.append(state)
            L.decayed.append(L.dA[:, :, t] * state)
            state = L.decayed[-1] + L.dBu[:, :, t]
            L.states.append(state)
            ys.append((state @ L.C[:, t, :, None])[..., 0])
        L.scan = torch.stack(ys, -1)  # (B, I, T)
        L.uD = L.u * sd[m + "D"].float()[None, :, None]
        L.s = L.scan + L.uD
        L.y = L.s * ra.silu(L.z)
        L.out = ra.linear(L.y.transpose(1, 2), sd[m + "out_proj.weight"])
        L.res = h.float() if cfg.residual_in_fp32 else h
        h = L.h_out = L.res + L.out
        tape.layers.append(L)
    tape.nf = ra.rms_norm(h, sd["backbone.norm_f.weight"], cfg.layer_norm_epsilon)
    tape.W_head = sd["lm_head.weight"]
    tape.logits = ra.linear(tape.nf, tape.W_head)
    return tape


def mamba_relevance(model: Any, ids: Tensor, position: int = -1, token: int = 0,
                    epsilon: float = 0.0, stabilizer: float = 0.0) -> Tensor:
    """MambaLRP: Delta, A, B, C held (the scan linear in u: each state a proportional sum
    of the decayed previous state and the new input, read out by C); the gate
    (scan + u D) * silu(z) uniform, SiLU and RMSNorm identity, the causal conv1d and the
    projections linear (epsilon, bias absorbed)."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    t = mamba_forward(model, ids)
    B, T = ids.shape
    R = ra.start(t.logits, (torch.arange(B), torch.full((B,), position % T),
                            torch.full((B,), token)))
    R = ra.rel_linear(t.nf, t.W_head, t.logits, R, epsilon)  # RMSNorm: identity
    for i in reversed(range(cfg.num_hidden_layers)):
        p, L = f"backbone.layers.{i}.", t.layers[i]
        m = p + "mixer."
        R_h, R_out = ra.rel_sum([L.res, L.out], L.h_out, R, stabilizer)
        R_y = ra.rel_linear(L.y.transpose(1, 2), sd[m + "out_proj.weight"], L.out, R_out,
                            epsilon).transpose(1, 2)
        R_s, R_z = ra.rel_product(R_y)  # silu(z): identity
        R_scan, R_u = ra.rel_sum([L.scan, L.uD], L.s, R_s, stabilizer)  # D: a constant scale
        R_state = torch.zeros_like(L.states[0])
        R_dBu = torch.zeros_like(L.dBu)
        for step in reversed(range(T)):
            st = L.states[step]
            R_state = R_state + st * L.C[:, step, None, :] * ra.safe_div(
                R_scan[..., step], L.scan[..., step])[..., None]  # C held
            R_prev, R_new = ra.rel_sum([L.decayed[step], L.dBu[:, :, step]], st, R_state,
                                       stabilizer)
            R_dBu[:, :, step] = R_new
            R_state = R_prev  # the held decay passes it on
        R_u = R_u + R_dBu.sum(-1)  # dB held; the copies over the state dimension sum back
        # silu: identity; the causal depthwise conv1d: epsilon rule, bias absorbed
        w = sd[m + "conv1d.weight"]
        K = w.shape[-1]
        c = R_u / ra.stab(L.conv, epsilon) if epsilon else ra.safe_div(R_u, L.conv)
        padded = torch.nn.functional.pad(c, (0, K - 1))
        # out[t] = sum_k w[k] xs[t + k - (K - 1)]: xs[s] reaches out[s + K - 1 - k]
        back = sum(w[None, :, 0, k, None] * padded[..., K - 1 - k:K - 1 - k + T]
                   for k in range(K))
        R_xs = L.xs * back
        R_proj = torch.cat([R_xs, R_z], 1).transpose(1, 2)
        R_n = ra.rel_linear(L.n, sd[m + "in_proj.weight"], L.proj.transpose(1, 2), R_proj,
                            epsilon)
        R = R_h + R_n  # RMSNorm: identity
    return R


# --------------------------------------------------------------------------- SigLIP


def tiny_siglip(seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any) -> Any:
    """A SiglipModel: text tower (last-token pooling) and vision tower (its attention
    pooling head: nn.MultiheadAttention from a learned probe)."""
    from transformers import SiglipConfig, SiglipModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)
    kw = dict(text_config=dict(tower, vocab_size=50, max_position_embeddings=16),
              vision_config=dict(tower, image_size=16, patch_size=8, num_channels=3),
              **overrides)
    return _build(SiglipModel, SiglipConfig(**kw), seed, attn_implementation)


# --------------------------------------------------------------------------- DeBERTa-v2


def tiny_deberta_v2(seed: int = 0, **overrides: Any) -> Any:
    """Disentangled attention (content-to-position and position-to-content, relative
    positions in 8 log buckets), a sequence classifier with 3 labels."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    kw = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, relative_attention=True,
              position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
              initializer_range=0.2)
    kw.update(overrides)
    return _build(DebertaV2ForSequenceClassification, DebertaV2Config(**kw), seed, None)


# --------------------------------------------------------------------------- T5


def _t5_buckets(rel: Tensor, bidirectional: bool, num_buckets: int,
                max_distance: int) -> Tensor:
    """T5's relative position buckets (exact below half the buckets, log-spaced above)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < exact, rel, large)


def _t5_bias(sd: dict[str, Tensor], stack: str, cfg: Any, T: int) -> Tensor:
    rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    b = _t5_buckets(rel, stack == "encoder", cfg.relative_attention_num_buckets,
                    cfg.relative_attention_max_distance)
    W = sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return W[b].permute(2, 0, 1)[None]  # (1, H, T, T)


def _t5_norm(h: Tensor, w: Tensor, eps: float) -> Tensor:
    """T5LayerNorm: the mean square in float32, applied to the float64 h."""
    return w * (h * torch.rsqrt(h.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps))


def t5_forward(model: Any, ids: Tensor, dec: Tensor, attention_mask: Tensor) -> Any:
    """Every intermediate of T5ForConditionalGeneration (relu feed-forward, unscaled
    scores, relative position biases, the decoder's output scaled by d_model^-0.5)."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    H, e = cfg.num_heads, cfg.layer_norm_epsilon
    T, S = ids.shape[1], dec.shape[1]
    pad = ra.padding_mask(attention_mask)
    t = ra.Tape(enc=[], dec=[])

    def attention(p: str, x: Tensor, kv: Tensor, mask: Tensor) -> Any:
        A = ra.Tape(x=x, kv=kv)
        A.q = ra.linear(x, sd[p + "q.weight"])
        A.k = ra.linear(kv, sd[p + "k.weight"])
        A.v = ra.linear(kv, sd[p + "v.weight"])
        A.att = ra.attn_forward(ra.heads(A.q, H), ra.heads(A.k, H), ra.heads(A.v, H), 1.0,
                                mask, False)
        A.o_in = ra.merge(A.att.O)
        A.o = ra.linear(A.o_in, sd[p + "o.weight"])
        return A

    def ff(p: str, x: Tensor) -> Any:
        F_ = ra.Tape(x=x, f=ra.linear(x, sd[p + "DenseReluDense.wi.weight"]))
        F_.a = torch.relu(F_.f)
        F_.y = ra.linear(F_.a, sd[p + "DenseReluDense.wo.weight"])
        return F_

    h = sd["shared.weight"][ids]
    mask = _t5_bias(sd, "encoder", cfg, T) + pad
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        L = ra.Tape(h_in=h)
        L.n1 = _t5_norm(h, sd[p + "0.layer_norm.weight"], e)
        L.sa = attention(p + "0.SelfAttention.", L.n1, L.n1, mask)
        L.s1 = h + L.sa.o
        L.n2 = _t5_norm(L.s1, sd[p + "1.layer_norm.weight"], e)
        L.ff = ff(p + "1.", L.n2)
        h = L.h_out = L.s1 + L.ff.y
        t.enc.append(L)
    t.enc_h = h
    t.enc_out = _t5_norm(h, sd["encoder.final_layer_norm.weight"], e)
    g = sd["shared.weight"][dec]
    causal = ra.causal_mask(S)[None, None]
    self_mask = _t5_bias(sd, "decoder", cfg, S) + causal
    for i in range(cfg.num_decoder_layers):
        p = f"decoder.block.{i}.layer."
        L = ra.Tape(g_in=g)
        L.n1 = _t5_norm(g, sd[p + "0.layer_norm.weight"], e)
        L.sa = attention(p + "0.SelfAttention.", L.n1, L.n1, self_mask)
        L.s1 = g + L.sa.o
        L.n2 = _t5_norm(L.s1, sd[p + "1.layer_norm.weight"], e)
        L.ca = attention(p + "1.EncDecAttention.", L.n2, t.enc_out, pad)
        L.s2 = L.s1 + L.ca.o
        L.n3 = _t5_norm(L.s2, sd[p + "2.layer_norm.weight"], e)
        L.ff = ff(p + "2.", L.n3)
        g = L.g_out = L.s2 + L.ff.y
        t.dec.append(L)
    t.dec_h = g
    t.dec_out = _t5_norm(g, sd["decoder.final_layer_norm.weight"], e) * cfg.d_model ** -0.5
    t.logits = ra.linear(t.dec_out, sd["lm_head.weight"])
    return t


def t5_relevance(model: Any, ids: Tensor, dec: Tensor, attention_mask: Tensor,
                 token: int = 0, epsilon: float = 0.0, stabilizer: float = 0.0) -> Tensor:
    """Relevance (B, T, D) at the encoder's token embeddings of the decoder's last logit
    of `token`. The decoder's own tokens are constants: what depends on them alone (its
    first self-attention) takes no relevance, their share of a sum is dropped, and the
    first cross-attention's queries are constant, so its scores pass relevance to the
    keys whole (a product with a constant factor) rather than half. The relative
    position bias is a constant summand of the scores, taking its share."""
    ra, cfg, sd = _ra(), model.config, _sd(model)
    H = cfg.num_heads
    t = t5_forward(model, ids, dec, attention_mask)
    B, S = dec.shape
    R = ra.start(t.logits, (torch.arange(B), torch.full((B,), S - 1), torch.full((B,), token)))
    R = ra.rel_linear(t.dec_out, sd["lm_head.weight"], t.logits, R, epsilon)  # scale, norm: id

    def ff_back(p: str, F_: Any, R_y: Tensor) -> Tensor:
        R_a = ra.rel_linear(F_.a, sd[p + "DenseReluDense.wo.weight"], F_.y, R_y, epsilon)
        return ra.rel_linear(F_.x, sd[p + "DenseReluDense.wi.weight"], F_.f, R_a, epsilon)

    def attn_back(p: str, A: Any, R_o: Tensor, constant_query: bool) -> tuple[Tensor, Tensor]:
        """(relevance at the query input, at the key/value input)."""
        R_oin = ra.rel_linear(A.o_in, sd[p + "o.weight"], A.o, R_o, epsilon)
        c = A.att
        R_A, R_v = ra.rel_matmul(c.A, c.v, c.O, ra.heads(R_oin, H))
        R_x = ra.rel_softmax(c.x, c.A, R_A)
        # the position bias (and the mask) a constant summand: its share dropped
        R_z = ra.rel_sum([c.z], c.x, R_x, stabilizer)[0]
        if constant_query:
            R_q, R_kT = torch.zeros_like(c.q), c.kT * (c.q.transpose(-1, -2) @ ra.safe_div(
                R_z, c.z))
        else:
            R_q, R_kT = ra.rel_matmul(c.q, c.kT, c.z, R_z)
        R_kv = (ra.rel_linear(A.kv, sd[p + "k.weight"], A.k,
                              ra.merge(R_kT.transpose(-1, -2)), epsilon)
                + ra.rel_linear(A.kv, sd[p + "v.weight"], A.v, ra.merge(R_v), epsilon))
        return ra.rel_linear(A.x, sd[p + "q.weight"], A.q, ra.merge(R_q), epsilon), R_kv

    R_enc = torch.zeros_like(t.enc_out)
    for i in reversed(range(cfg.num_decoder_layers)):
        p, L = f"decoder.block.{i}.layer.", t.dec[i]
        first = i == 0  # its input, the decoder's embeddings, is constant
        R_s2, R_ff = ra.rel_sum([L.s2, L.ff.y], L.g_out, R, stabilizer)
        R_s2 = R_s2 + ff_back(p + "2.", L.ff, R_ff)  # norm: identity
        R_s1, R_ca = ra.rel_sum([L.s1, L.ca.o], L.s2, R_s2, stabilizer)
        R_n2, R_kv = attn_back(p + "1.EncDecAttention.", L.ca, R_ca, constant_query=first)
        R_enc = R_enc + R_kv
        if first:
            break  # s1 = embeddings + self-attention of them: constant, its share dropped
        R_s1 = R_s1 + R_n2
        R_g, R_sa = ra.rel_sum([L.g_in, L.sa.o], L.s1, R_s1, stabilizer)
        R_n1q, R_n1kv = attn_back(p + "0.SelfAttention.", L.sa, R_sa, constant_query=False)
        R = R_g + R_n1q + R_n1kv
    R = R_enc  # the encoder's final norm: identity
    for i in reversed(range(cfg.num_layers)):
        p, L = f"encoder.block.{i}.layer.", t.enc[i]
        R_s1, R_ff = ra.rel_sum([L.s1, L.ff.y], L.h_out, R, stabilizer)
        R_s1 = R_s1 + ff_back(p + "1.", L.ff, R_ff)
        R_h, R_sa = ra.rel_sum([L.h_in, L.sa.o], L.s1, R_s1, stabilizer)
        R_q, R_kv = attn_back(p + "0.SelfAttention.", L.sa, R_sa, constant_query=False)
        R = R_h + R_q + R_kv
    return R
