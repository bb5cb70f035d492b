"""Checks of the explicit AttnLRP reference (reference_attnlrp.py) itself.

Its forward must reproduce Hugging Face's logits; its rules are unit-tested
against explicit per-term sums; on a bias-free LLaMA with epsilon = stabilizer
= 0 relevance is conserved stage by stage except at the softmax; and the whole
backward equals gradient x input of a forward rewritten in AttnLRP's gradient
form (an independent formulation of the same rules).
"""

from __future__ import annotations

import pytest
import reference_attnlrp as ra
import torch

F64 = torch.float64
BUILDERS = {"llama": ra.tiny_llama, "gpt2": ra.tiny_gpt2, "bert": ra.tiny_bert, "vit": ra.tiny_vit}


def _ids(B: int = 2, T: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_forward_reproduces_hf_logits(family: str, impl: str) -> None:
    model = BUILDERS[family](0, impl)
    assert model.dtype == F64 and not model.training
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        if family == "vit":
            x = _pixels()
            hf, ours = model(x).logits, ra.vit_forward(model, x).logits
        else:
            ids = _ids()
            hf = model(ids).logits
            ours = getattr(ra, f"{family}_forward")(model, ids).logits
    assert hf.abs().max() > 0.3  # logits O(1): the relevance is not trivially ~0
    assert (hf - ours).abs().max() <= 1e-10


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_forward_with_padding(impl: str) -> None:
    model = ra.tiny_bert(0, impl)
    ids = _ids()
    am = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        hf = model(ids, attention_mask=am).logits
    assert (hf - ra.bert_forward(model, ids, am).logits).abs().max() <= 1e-10


def test_eager_and_sdpa_models_share_weights() -> None:
    for build in BUILDERS.values():
        a, b = build(3, "eager"), build(3, "sdpa")
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(),
                                      strict=True):
            assert torch.equal(p, q), n


# --------------------------------------------------------------------------- rule unit tests


def test_uniform_split_gives_half_per_operand() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=F64)
    b = torch.randn(2, 3, 5, 6, generator=g, dtype=F64)
    z = a @ b
    R = torch.randn(z.shape, generator=g, dtype=F64)
    Ra, Rb = ra.rel_matmul(a, b, z, R)
    # term by term: R_a[i, d] = 0.5 sum_j a_id b_dj R_ij / z_ij, R_b[d, j] likewise over i
    terms = a[..., :, :, None] * b[..., None, :, :] * (R / z)[..., :, None, :]  # (.., i, d, j)
    assert torch.allclose(Ra, 0.5 * terms.sum(-1), rtol=0, atol=1e-12)
    assert torch.allclose(Rb, 0.5 * terms.sum(-3), rtol=0, atol=1e-12)
    assert torch.allclose(Ra.sum((-1, -2)), 0.5 * R.sum((-1, -2)), rtol=0, atol=1e-12)
    assert torch.allclose(Rb.sum((-1, -2)), 0.5 * R.sum((-1, -2)), rtol=0, atol=1e-12)
    # one product term: a 1x1 times 1x1 matrix
    Ra1, Rb1 = ra.rel_matmul(torch.tensor([[2.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64),
                             torch.tensor([[6.0]], dtype=F64), torch.tensor([[6.0]], dtype=F64))
    assert Ra1.item() == 3.0 and Rb1.item() == 3.0
    assert ra.rel_product(torch.tensor([4.0]))[0].item() == 2.0


def test_stab_sign_of_zero_is_plus() -> None:
    z = torch.tensor([-2.0, 0.0, 3.0], dtype=F64)
    assert ra.stab(z, 0.1).tolist() == [-2.1, 0.1, 3.1]


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_linear_rule_term_by_term(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=F64)
    W = torch.randn(4, 5, generator=g, dtype=F64)
    b = torch.randn(4, generator=g, dtype=F64)
    y = x @ W.T + b
    R = torch.randn(3, 4, generator=g, dtype=F64)
    expect = torch.zeros_like(x)
    for n in range(3):
        for i in range(5):
            for j in range(4):
                d = y[n, j] + eps * (1.0 if y[n, j] >= 0 else -1.0)
                expect[n, i] += x[n, i] * W[j, i] * R[n, j] / d
    assert torch.allclose(ra.rel_linear(x, W, y, R, eps), expect, rtol=0, atol=1e-12)
    # GPT-2's Conv1D stores W transposed
    assert torch.allclose(ra.rel_conv1d(x, W.T, y, R, eps), expect, rtol=0, atol=1e-12)


def test_softmax_rule_is_gradient_times_input_and_masks_get_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g, dtype=F64)
    x[1, 4:] = torch.finfo(F64).min
    x[2, 5] = float("-inf")
    s = torch.softmax(x, -1)
    ok = torch.isfinite(x) & (x > -1e300)
    R = torch.randn(3, 6, generator=g, dtype=F64) * ok  # masked weights (0) carry none
    Rx = ra.rel_softmax(x, s, R)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(torch.softmax(xg, -1), xg, ra.safe_div(R, s))  # c_s = R_s / s
    assert torch.allclose(Rx[ok], (x * grad)[ok], rtol=0, atol=1e-12)
    assert torch.isfinite(Rx).all() and (Rx[~ok] == 0).all()
    assert not torch.allclose(Rx.sum(-1), R.sum(-1))  # not conservative


def test_layernorm_rule_term_by_term() -> None:
    g = torch.Generator().manual_seed(0)
    n, e, st = 6, 1e-5, 1e-3
    x = torch.randn(2, n, generator=g, dtype=F64)
    gamma = torch.randn(n, generator=g, dtype=F64)
    beta = torch.randn(n, generator=g, dtype=F64)
    y = ra.layernorm(x, gamma, beta, e)
    assert torch.allclose(y, torch.nn.functional.layer_norm(x, (n,), gamma, beta, e), atol=1e-14)
    R = torch.randn(2, n, generator=g, dtype=F64)
    std = torch.sqrt(x.var(-1, unbiased=False) + e)
    expect = torch.zeros_like(x)
    for b in range(2):  # y_j = sum_i gamma_j (delta_ij - 1/n) x_i / std + beta_j, epsilon rule
        for i in range(n):
            for j in range(n):
                w = gamma[j] * ((1.0 if i == j else 0.0) - 1.0 / n) / std[b]
                expect[b, i] += x[b, i] * w * R[b, j] / ra.stab(y[b, j], st)
    assert torch.allclose(ra.rel_layernorm(x, y, gamma, R, e, st), expect, rtol=0, atol=1e-12)


def test_rope_rule() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 8, generator=g, dtype=F64)
    cos, sin = ra.rope_tables(ra.tiny_llama(0).config, 5)
    c = ra.rope_forward(x, cos, sin)
    R = torch.randn(c.y.shape, generator=g, dtype=F64)
    Rx = ra.rope_backward(c, R, 0.0)
    # y_i = x_i cos_i + sign_i x_{i +- h} sin_i: proportional split over the two terms
    h = 4
    expect = torch.zeros_like(x)
    for i in range(8):
        partner = i + h if i < h else i - h
        expect[..., i] += x[..., i] * cos[:, i] * R[..., i] / c.y[..., i]
        sign = -1.0 if i < h else 1.0
        expect[..., partner] += sign * x[..., partner] * sin[:, i] * R[..., i] / c.y[..., i]
    assert torch.allclose(Rx, expect, rtol=0, atol=1e-12)
    assert torch.allclose(Rx.sum(), R.sum(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- conservation


def test_llama_conservation_layer_by_layer() -> None:
    model = ra.tiny_llama(0)  # LLaMA: no biases
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    ids, token, tr = _ids(), 3, {}
    R = ra.llama_relevance(model, ids, token=token, epsilon=0.0, stabilizer=0.0, trace=tr)
    logit = ra.llama_forward(model, ids).logits[:, -1, token]

    def S(k: str) -> torch.Tensor:
        return tr[k].sum(tuple(range(1, tr[k].dim())))  # per sample

    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (a, b)

    same(S("logits"), logit)
    same(S("final_norm.in"), logit)  # lm_head (epsilon 0, no bias) and RMSNorm conserve
    defect = torch.zeros_like(logit)
    for i in range(model.config.num_hidden_layers):
        a = f"{i}.attn"
        same(S(f"{i}.mlp.m"), S(f"{i}.mlp.out"))
        same(S(f"{i}.mlp.in"), S(f"{i}.mlp.out"))  # silu(g) * u: 0.5 + 0.5
        same(S(f"{i}.mid") - S(f"{i}.mlp.in"), S(f"{i}.out") - S(f"{i}.mlp.out"))  # residual
        same(S(f"{a}.O"), S(f"{a}.out"))  # o_proj
        same(S(f"{a}.A") + S(f"{a}.v"), S(f"{a}.O"))  # A V: uniform
        same(S(f"{a}.q") + S(f"{a}.k"), S(f"{a}.z"))  # Q K^T: uniform
        same(S(f"{a}.q"), S(f"{a}.k"))  # ... half each
        same(S(f"{a}.z"), S(f"{a}.logits"))  # constant scale, causal mask
        same(S(f"{a}.k_rope"), S(f"{a}.k"))  # repeat_kv summed back
        same(S(f"{a}.q_lin") + S(f"{a}.k_lin"), S(f"{a}.q") + S(f"{a}.k"))  # RoPE
        same(S(f"{a}.in"), S(f"{a}.q_lin") + S(f"{a}.k_lin") + S(f"{a}.v_heads"))
        same(S(f"{i}.in") - S(f"{a}.in"), S(f"{i}.mid") - S(f"{a}.out"))  # residual
        defect += S(f"{a}.logits") - S(f"{a}.A")  # the softmax: not conservative
    assert defect.abs().max() > 1e-3  # so the identity below tests something
    same(R.sum((1, 2)), logit + defect)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_positions_after_the_target_get_nothing(family: str) -> None:
    model = BUILDERS[family](0)
    R = getattr(ra, f"{family}_relevance")(model, _ids(), position=3, token=5)
    assert (R[:, 4:] == 0).all() and R[:, :4].abs().max() > 1e-3


def test_bert_padding() -> None:
    model = ra.tiny_bert(0)
    ids = _ids(1)
    padded = torch.cat([ids[:, :4], torch.zeros(1, 3, dtype=ids.dtype)], 1)
    am = torch.tensor([[1] * 4 + [0] * 3])
    Rp = ra.bert_relevance(model, padded, label=1, attention_mask=am, stabilizer=0.0)
    Rs = ra.bert_relevance(model, ids[:, :4], label=1, stabilizer=0.0)
    assert (Rp[:, 4:] == 0).all()
    assert torch.allclose(Rp[:, :4], Rs, rtol=0, atol=1e-12)


def test_vit_relevance_shape_and_patch_conservation() -> None:
    model = ra.tiny_vit(0)
    with torch.no_grad():
        model.vit.embeddings.patch_embeddings.projection.bias.zero_()
    x, tr = _pixels(), {}
    R = ra.vit_relevance(model, x, label=2, epsilon=0.0, trace=tr)
    assert R.shape == x.shape
    assert torch.allclose(R.sum((1, 2, 3)), tr["patches"].sum((1, 2)), rtol=0, atol=1e-12)
    assert R.abs().max() > 1e-3


def test_epsilon_absorbs() -> None:
    model, ids = ra.tiny_gpt2(0), _ids()
    small = ra.gpt2_relevance(model, ids, token=2, epsilon=1e-6)
    large = ra.gpt2_relevance(model, ids, token=2, epsilon=0.1)
    assert large.abs().sum() < small.abs().sum()


# --------------------------------------------------------------------------- gradient form


def _identity_rule(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value (= f(x)) with gradient f(x) / x: R_x = R_y in gradient x input."""
    return x * (value / x).detach()


def _half(x: torch.Tensor) -> torch.Tensor:
    """x, with half its gradient (an operand of a uniformly split product)."""
    return 0.5 * x + (0.5 * x).detach()


def _llama_gradient_form(model, ids: torch.Tensor, position: int, token: int) -> torch.Tensor:
    """AttnLRP with epsilon = stabilizer = 0 as gradient x input of a rewritten forward:
    norms and SiLU by the identity rule, products with half gradients, the rest plain."""
    cfg, sd = model.config, model.state_dict()
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    n_rep, hd = H // KV, cfg.head_dim
    T = ids.shape[1]
    cos, sin = ra.rope_tables(cfg, T)
    mask = ra.causal_mask(T)
    emb = sd["model.embed_tokens.weight"][ids].clone().requires_grad_()

    def norm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _identity_rule(h, ra.rms_norm(h.detach(), w, cfg.rms_norm_eps))

    h = emb
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        n = norm(h, sd[p + "input_layernorm.weight"])
        q, k, v = (ra.heads(n @ sd[p + f"self_attn.{c}_proj.weight"].T, m)
                   for c, m in (("q", H), ("k", KV), ("v", KV)))
        q = q * cos + ra.rotate_half(q) * sin
        k = (k * cos + ra.rotate_half(k) * sin).repeat_interleave(n_rep, 1)
        v = v.repeat_interleave(n_rep, 1)
        A = torch.softmax(_half(q) @ _half(k).transpose(-1, -2) * hd ** -0.5 + mask, -1)
        o = ra.merge(_half(A) @ _half(v)) @ sd[p + "self_attn.o_proj.weight"].T
        h = h + o
        n = norm(h, sd[p + "post_attention_layernorm.weight"])
        g = n @ sd[p + "mlp.gate_proj.weight"].T
        u = n @ sd[p + "mlp.up_proj.weight"].T
        a = _identity_rule(g, ra.silu(g.detach()))
        h = h + (_half(a) * _half(u)) @ sd[p + "mlp.down_proj.weight"].T
    logits = norm(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
    (grad,) = torch.autograd.grad(logits[:, position, token].sum(), emb)
    return emb.detach() * grad


def test_llama_backward_equals_gradient_form() -> None:
    model = ra.tiny_llama(0, "sdpa")  # float64 softmax: no float32 step in the gradient
    ids = _ids()
    ref = ra.llama_relevance(model, ids, position=5, token=7, epsilon=0.0, stabilizer=0.0)
    grad_form = _llama_gradient_form(model, ids, 5, 7)
    assert ref.abs().max() > 1e-2
    assert (ref - grad_form).abs().max() <= 1e-10 * ref.abs().max()
    # the stabilizers' effect is small but visible
    stabilised = ra.llama_relevance(model, ids, position=5, token=7, epsilon=0.1)
    assert (stabilised - ref).abs().max() > 1e-4


def _gpt2_gradient_form(model, ids: torch.Tensor, position: int, token: int) -> torch.Tensor:
    """As above for GPT-2: LayerNorm with its std detached, NewGELU by the identity rule,
    biases and position embeddings plain summands (absorbed at epsilon = 0)."""
    cfg, sd = model.config, model.state_dict()
    H, D, e = cfg.n_head, cfg.n_embd, cfg.layer_norm_epsilon
    T = ids.shape[1]
    mask = ra.causal_mask(T)
    wte = sd["transformer.wte.weight"][ids].clone().requires_grad_()

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True)
        std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + e).detach()
        return sd[name + ".weight"] * c / std + sd[name + ".bias"]

    h = wte + sd["transformer.wpe.weight"][:T]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        qkv = ln(h, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = (ra.heads(t, H) for t in qkv.split(D, 2))
        A = torch.softmax(_half(q) @ _half(k).transpose(-1, -2) * (D // H) ** -0.5 + mask, -1)
        h = h + ra.merge(_half(A) @ _half(v)) @ sd[p + "attn.c_proj.weight"] \
            + sd[p + "attn.c_proj.bias"]
        f = ln(h, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"]
        a = _identity_rule(f, ra.new_gelu(f.detach()))
        h = h + a @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    logits = ln(h, "transformer.ln_f") @ sd["transformer.wte.weight"].T
    (grad,) = torch.autograd.grad(logits[:, position, token].sum(), wte)
    return wte.detach() * grad


def test_gpt2_backward_equals_gradient_form() -> None:
    model = ra.tiny_gpt2(0, "eager")
    ids = _ids()
    ref = ra.gpt2_relevance(model, ids, position=4, token=9, epsilon=0.0, stabilizer=0.0)
    grad_form = _gpt2_gradient_form(model, ids, 4, 9)
    assert ref.abs().max() > 1e-2
    assert (ref - grad_form).abs().max() <= 1e-10 * ref.abs().max()
