"""Vision transformers explain unchanged with AttnLRP (issue 12, vision part).

- Hugging Face ViTForImageClassification (eager and SDPA attention) equals the
  explicit layer-by-layer reference (tests/reference_attnlrp.py, nothing from
  relprop) in float64.
- torchvision's VisionTransformer runs nn.MultiheadAttention, which relprop
  rewrites into F.linear / heads / F.scaled_dot_product_attention / F.linear
  (relprop.passes.multihead): the forward equals the model's, and relevance
  equals an explicit reference written here from the state dict with the
  reference's rule functions.
- nn.MultiheadAttention with separate q/k/v weights (kdim, vdim), cross
  attention and a key padding mask equals relprop on a hand-written twin.
- torchvision's Swin transformer runs (window attention by matmul + softmax,
  relative position bias and shift masks as constant summands, roll, pad).
- timm's VisionTransformer: fused (F.sdpa) and unfused attention agree.
Tiny models, random weights, float64.
"""

from __future__ import annotations

import copy
import functools

import pytest
import reference_attnlrp as ra
import torch
import torch.nn.functional as F
from checks import snapshot
from torch import nn

import relprop
from relprop.errors import UnsupportedOperationError

F64 = torch.float64


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _randomised(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Every parameter random (torchvision zero-initialises the head), LayerNorm weights
    near 1; float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(F64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = scale * torch.randn(p.shape, generator=g, dtype=F64)
            is_norm_weight = p.dim() == 1 and "norm" in name.lower() or name.endswith(
                ("ln_1.weight", "ln_2.weight", "ln.weight"))
            p.copy_(1.0 + noise if is_norm_weight and name.endswith("weight") else noise)
    return model


# --------------------------------------------------------------------------- Hugging Face ViT


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_vit_equals_the_explicit_reference(attn: str) -> None:
    model = ra.tiny_vit(0, attn)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    label = torch.tensor([1, 2])
    R = relprop.Explainer(model, "attnlrp", epsilon=1e-6, stabilizer=0.0)(x, target=label).relevance
    ref = ra.vit_relevance(model, x, label=label, stabilizer=0.0)
    # eager: HF computes the softmax in float32 inside the float64 model, so its
    # backward (the Taylor rule's gradient) runs in float32: ~4e-8; SDPA: ~1e-15
    assert _relative(R, ref) < (1e-6 if attn == "eager" else 1e-12)
    # the default stabilizer (1e-6): eager ViT adds transformers' all-zero attention mask
    # to the scores; a constant mask before an attention softmax passes relevance to the
    # scores (as inside SDPA), so eager stays as close as above
    R = relprop.Explainer(model, "attnlrp", epsilon=1e-6)(x, target=label).relevance
    ref = ra.vit_relevance(model, x, label=label)
    assert _relative(R, ref) < (1e-6 if attn == "eager" else 1e-12)


# --------------------------------------------------------------------------- torchvision ViT


def tiny_torchvision_vit(seed: int = 0) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                              hidden_dim=32, mlp_dim=64, num_classes=5)
    return _randomised(model, seed)


def torchvision_vit_relevance(model: nn.Module, x: torch.Tensor, label: torch.Tensor,
                              epsilon: float = 1e-6, stabilizer: float = 1e-6) -> torch.Tensor:
    """AttnLRP for torchvision's VisionTransformer, layer by layer from its state dict
    with the rule functions of tests/reference_attnlrp.py (module docstring there)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    H, P, D = model.encoder.layers[0].num_heads, model.patch_size, model.hidden_dim
    ln = functools.partial(ra.layernorm, ln_eps=1e-6)
    B = x.shape[0]
    # forward, every intermediate kept
    cols = F.unfold(x, kernel_size=P, stride=P).transpose(1, 2)
    W_patch = sd["conv_proj.weight"].reshape(D, -1)
    patches = ra.linear(cols, W_patch, sd["conv_proj.bias"])
    tokens = torch.cat([sd["class_token"].expand(B, 1, D), patches], dim=1)
    h = h0 = tokens + sd["encoder.pos_embedding"]
    layers = []
    for i in range(len(model.encoder.layers)):
        p = f"encoder.layers.encoder_layer_{i}."
        L = ra.Tape(h_in=h)
        L.n1 = ln(h, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        W_in, b_in = sd[p + "self_attention.in_proj_weight"], sd[p + "self_attention.in_proj_bias"]
        L.qkv = [ra.linear(L.n1, W, b) for W, b in zip(W_in.chunk(3), b_in.chunk(3),
                                                       strict=True)]
        L.W_qkv = W_in.chunk(3)
        L.att = ra.attn_forward(*(ra.heads(t, H) for t in L.qkv), (D // H) ** -0.5, None, False)
        L.o_in = ra.merge(L.att.O)
        L.o = ra.linear(L.o_in, sd[p + "self_attention.out_proj.weight"],
                        sd[p + "self_attention.out_proj.bias"])
        L.h_mid = L.o + h
        L.n2 = ln(L.h_mid, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        L.f = ra.linear(L.n2, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])
        L.a = ra.gelu(L.f)
        L.mlp = ra.linear(L.a, sd[p + "mlp.3.weight"], sd[p + "mlp.3.bias"])
        h = L.h_out = L.h_mid + L.mlp
        layers.append(L)
    nf = ln(h, sd["encoder.ln.weight"], sd["encoder.ln.bias"])
    logits = ra.linear(nf[:, 0], sd["heads.head.weight"], sd["heads.head.bias"])
    torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-12)
    # relevance, back rule by rule
    R = ra.start(logits, (torch.arange(B), label))
    R_cls = ra.rel_linear(nf[:, 0], sd["heads.head.weight"], logits, R, epsilon)
    R = torch.zeros_like(nf)
    R[:, 0] = R_cls
    R = ra.rel_layernorm(h, nf, sd["encoder.ln.weight"], R, 1e-6, stabilizer)
    for i in reversed(range(len(layers))):
        p, L = f"encoder.layers.encoder_layer_{i}.", layers[i]
        R_mid, R_mlp = ra.rel_sum([L.h_mid, L.mlp], L.h_out, R, stabilizer)
        R_a = ra.rel_linear(L.a, sd[p + "mlp.3.weight"], L.mlp, R_mlp, epsilon)  # GELU: identity
        R_n2 = ra.rel_linear(L.n2, sd[p + "mlp.0.weight"], L.f, R_a, epsilon)
        R_mid = R_mid + ra.rel_layernorm(L.h_mid, L.n2, sd[p + "ln_2.weight"], R_n2, 1e-6,
                                         stabilizer)
        R_o, R_h = ra.rel_sum([L.o, L.h_in], L.h_mid, R_mid, stabilizer)
        R_oin = ra.rel_linear(L.o_in, sd[p + "self_attention.out_proj.weight"], L.o, R_o,
                              epsilon)
        R_qkv = ra.attn_backward(L.att, ra.heads(R_oin, H), stabilizer, "pass", None, "")
        R_n1 = sum(ra.rel_linear(L.n1, W, y, ra.merge(Rx), epsilon)
                   for W, y, Rx in zip(L.W_qkv, L.qkv, R_qkv, strict=True))
        R = R_h + ra.rel_layernorm(L.h_in, L.n1, sd[p + "ln_1.weight"], R_n1, 1e-6, stabilizer)
    R_tokens = ra.rel_sum([tokens], h0, R, stabilizer)[0]  # position embedding absorbs its share
    R_cols = ra.rel_linear(cols, W_patch, patches, R_tokens[:, 1:], epsilon)  # CLS: constant
    return F.fold(R_cols.transpose(1, 2), output_size=x.shape[-2:], kernel_size=P, stride=P)


@pytest.mark.parametrize("stabilizer", [0.0, 1e-6])
def test_torchvision_vit_equals_the_explicit_reference(stabilizer: float) -> None:
    model = tiny_torchvision_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=F64)
    label = torch.tensor([3, 1])
    before = snapshot(model)
    expl = relprop.Explainer(model, "attnlrp", epsilon=1e-6, stabilizer=stabilizer)(
        x, target=label)
    torch.testing.assert_close(expl.output, model(x), rtol=0, atol=1e-12)
    ref = torchvision_vit_relevance(model, x, label, stabilizer=stabilizer)
    assert _relative(expl.relevance, ref) < 1e-10
    assert snapshot(model) == before
    assert all(type(m) is not nn.MultiheadAttention or m.training is False
               for m in model.modules())


class _Cross(nn.Module):
    """Cross attention through nn.MultiheadAttention with kdim/vdim (separate q, k, v
    weights) or not (in_proj_weight's thirds), a boolean key padding mask and an
    additive attn_mask, then a classifier."""

    def __init__(self, kdim: int | None) -> None:
        super().__init__()
        self.memory = nn.Linear(8, kdim or 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 3)
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[0, 3:] = True
        self.register_buffer("pad", pad)
        self.register_buffer("bias", 0.5 * torch.randn(5, 5))
        if kdim is not None:  # additive masks (torch warns when the types differ)
            self.pad = torch.zeros(2, 5).masked_fill(pad, float("-inf"))
        else:  # boolean masks: True is not attended
            self.bias = self.bias > 0.8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory(x)
        out, _ = self.attention(x, memory, memory, key_padding_mask=self.pad,
                                attn_mask=self.bias, need_weights=False)
        return self.head(out + x).mean(1)


class _CrossTwin(nn.Module):
    """_Cross written by hand: nn.Linear projections, heads, F.scaled_dot_product_attention.

    Independent enough of relprop.passes.multihead: it goes through none of it (only
    relprop's rules for nn.Linear and F.scaled_dot_product_attention, which the HF ViT
    test above checks against the explicit reference), and its mask merging, weight
    slicing and head splitting are written here from torch's documentation; the
    forward is checked against nn.MultiheadAttention's own."""

    def __init__(self, cross: _Cross) -> None:
        super().__init__()
        a = cross.attention
        self.memory, self.head, self.heads = cross.memory, cross.head, a.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(1, 1) for _ in range(4))
        weights = ((a.q_proj_weight, a.k_proj_weight, a.v_proj_weight) if a.q_proj_weight
                   is not None else a.in_proj_weight.chunk(3))
        for lin, w, b in zip((self.q, self.k, self.v), weights, a.in_proj_bias.chunk(3),
                             strict=True):
            lin.weight, lin.bias = nn.Parameter(w.detach().clone()), nn.Parameter(
                b.detach().clone())
        self.o.weight = nn.Parameter(a.out_proj.weight.detach().clone())
        self.o.bias = nn.Parameter(a.out_proj.bias.detach().clone())
        def additive(m: torch.Tensor) -> torch.Tensor:
            return m.to(F64) if m.is_floating_point() else torch.zeros(
                m.shape, dtype=F64).masked_fill(m, float("-inf"))

        mask = additive(cross.bias) + additive(cross.pad)[:, None, None, :]
        self.register_buffer("mask", mask)  # (B, 1, L, S)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, E = t.shape
        return t.reshape(B, T, self.heads, E // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory(x)
        q, k, v = self.split(self.q(x)), self.split(self.k(memory)), self.split(self.v(memory))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        out = self.o(out.permute(0, 2, 1, 3).reshape(x.shape))
        return self.head(out + x).mean(1)


@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_cross_with_masks_equals_a_hand_written_twin(kdim) -> None:
    torch.manual_seed(0)
    model = _randomised(_Cross(kdim), 3)
    twin = _CrossTwin(model).to(F64).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=1e-12)
    expl = relprop.Explainer(model, "attnlrp")(x, target=1)
    torch.testing.assert_close(expl.output, model(x), rtol=0, atol=1e-12)
    R_twin = relprop.Explainer(twin, "attnlrp")(x, target=1).relevance
    assert _relative(expl.relevance, R_twin) < 1e-12
    assert expl.relevance.abs().max() > 0


class _Attend(nn.Module):
    def __init__(self, batch_first: bool = True, need_weights: bool = False, **kw) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(x, x, x, need_weights=self.need_weights)
        return out.sum(-1)


@pytest.mark.parametrize(("kw", "why"), [
    ({"batch_first": False}, "batch_first=False"),
    ({"need_weights": True}, "need_weights=True"),
    ({"add_bias_kv": True}, "add_bias_kv=True"),
    ({"add_zero_attn": True}, "add_zero_attn=True"),
])
def test_multihead_attention_refuses_what_it_does_not_explain(kw, why) -> None:
    with pytest.raises(UnsupportedOperationError, match=rf"MultiheadAttention.*'attention'.*{why}"):
        relprop.Explainer(_Attend(**kw), "attnlrp")(torch.randn(2, 5, 8), target=0)


# --------------------------------------------------------------------------- Swin


def test_torchvision_swin_runs_balanced_and_leaves_the_model_alone() -> None:
    """torchvision keeps shifted_window_attention whole for torch.fx (torch.fx.wrap): the
    Explainer defers to torch.export, which traces into it; the shift mask, written slice
    by slice into a new tensor, is constant computation."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = _randomised(SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                        num_heads=[2, 2], window_size=[4, 4], num_classes=5),
                        5, scale=0.2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6), dtype=F64)
    before = snapshot(model)
    explainer = relprop.Explainer(model, "attnlrp", record=True)
    expl = explainer(x, target=2)
    assert explainer.program.traced.method == "export"
    assert snapshot(model) == before
    torch.testing.assert_close(expl.output, model(x), rtol=0, atol=1e-12)
    R = expl.relevance
    assert R.shape == x.shape and torch.isfinite(R).all() and (R.abs().sum((1, 2, 3)) > 0).all()
    # AttnLRP's softmax rule is not conservative by design (its Taylor bias term): what it
    # leaks is "other"; every other leak is a bias's or a stabilizer's
    leaks = {e.node for e in expl.ledger if e.other.abs().max() > 1e-9 * expl.explained.abs().max()}
    assert leaks and all(n.startswith("softmax") for n in leaks), leaks
    softmax = sum(e.other for e in expl.ledger if e.node in leaks)
    totals = expl.ledger.totals()
    torch.testing.assert_close(totals["leaked"], expl.explained - R.sum((1, 2, 3)), rtol=1e-6,
                               atol=1e-9)
    torch.testing.assert_close(totals["bias"] + totals["stabilizer"] + softmax, totals["leaked"],
                               rtol=1e-6, atol=1e-9)
    # the fused forms (no recording; the same program: torch.export takes a minute here)
    # give the same relevance, and exactly that again on a re-run
    fused = explainer(x, target=2, record=False).relevance
    torch.testing.assert_close(fused, R, rtol=1e-9, atol=1e-12)
    assert torch.equal(explainer(x, target=2, record=False).relevance, fused)
    assert snapshot(model) == before


# --------------------------------------------------------------------------- timm ViT


def test_timm_vit_fused_and_unfused_attention_agree() -> None:
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    del timm
    torch.manual_seed(0)
    fused = _randomised(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                          num_heads=4, num_classes=5), 7)
    unfused = copy.deepcopy(fused)
    for blk in fused.blocks:
        blk.attn.fused_attn = True
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8), dtype=F64)
    a = relprop.Explainer(fused, "attnlrp")(x, target=torch.tensor([0, 4]))
    b = relprop.Explainer(unfused, "attnlrp")(x, target=torch.tensor([0, 4]))
    torch.testing.assert_close(a.output, fused(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.output, fused(x), rtol=0, atol=1e-12)
    assert a.relevance.abs().max() > 0
    assert _relative(b.relevance, a.relevance) < 1e-10


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_explains_torchvision_vit_b_16(tmp_path) -> None:
    """`relprop explain --model vit_b_16` with a saved state dict (random weights, the
    zero-initialised head made random so the explanation is not all zeros)."""
    import json

    import numpy as np
    import torchvision
    from PIL import Image

    from relprop.apps.cli import main

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "a.png"), "--model", "vit_b_16", "--weights",
                 str(tmp_path / "vit.pt"), "--size", "224", "--out", str(out)]) == 0
    rows = json.loads((out / "scores.json").read_text())
    assert len(rows) == 1 and np.isfinite(rows[0]["relevance_sum"])
    assert rows[0]["relevance_sum"] != 0
