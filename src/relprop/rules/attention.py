"""Rules for the parts of a transformer that are not linear layers (AttnLRP).

AttnLRP (Achtibat et al., ICML 2024), in gradient form (autograd carries
c = R / a):

- softmax s = softmax(x): R_x = x * (R_s - s * sum_j R_s_j), the Taylor rule at
  x, which is gradient x input of the softmax: the plain gradient, nothing to do.
- bilinear products of two input-dependent tensors (Q K^T, A V, the gated MLP's
  silu(g) * u): the uniform rule, each product term's relevance split half and
  half between its two factors. Plain gradient x input gives each factor the
  whole product (the sum doubles), so the rule is the gradient times 0.5 at
  each operand.
- scaled_dot_product_attention = softmax(Q K^T * scale + mask) V: by the two
  rules above, the gradients at q and k are the plain ones times 0.25 and at v
  times 0.5. The attention kernel's own backward computes the plain ones, so
  no attention matrix is materialised and memory stays that of a gradient.

CP-LRP (Ali et al., ICML 2022) holds the attention weights constant instead:
no relevance reaches q and k, and A V is a linear map of v (its gradient).

Cosine similarity of two embeddings (sentence similarity): the norms are held
constant (as RMSNorm's is) and the products x1_k x2_k split uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


class GradScale(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant factor."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scaled(x: Tensor, factor: float) -> Tensor:
    """x, with its gradient scaled by `factor` (1: x itself; 0: x detached)."""
    if factor == 1.0 or not x.requires_grad:
        return x
    if factor == 0.0:
        return x.detach()
    return GradScale.apply(x, factor)


@dataclass(frozen=True)
class AttentionRule:
    """How relevance crosses attention and the other products of two activations.

    `operand_share`: the gradient factor at each operand of a bilinear product
    (0.5: uniform rule). `weights_constant`: the attention weights are held
    constant (CP-LRP): q and k take no relevance, v all of it.
    """

    name: ClassVar[str] = "attention"
    operand_share: float = 0.5
    weights_constant: bool = False

    def describe(self) -> dict[str, Any]:
        return {"rule": type(self).__name__, "operand_share": self.operand_share,
                "weights_constant": self.weights_constant}

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> Tensor:
        """scaled_dot_product_attention with the rule's gradients at q, k and v.

        A constant mask that is exactly the causal one (a traced model builds it
        explicitly) runs as `is_causal=True`: the kernel then skips the masked half
        and keeps no mask for its backward; the values are the same."""
        shares = self.attention_shares(q.requires_grad, k.requires_grad, v.requires_grad)
        if attn_mask is not None and not is_causal and not attn_mask.requires_grad and \
                is_causal_mask(attn_mask, q.shape[-2], k.shape[-2]):
            attn_mask, is_causal = None, True
        return F.scaled_dot_product_attention(*(scaled(t, f) for t, f in zip((q, k, v), shares,
                                                                             strict=True)),
                                              attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)

    def attention_shares(self, q: bool, k: bool, v: bool) -> tuple[float, float, float]:
        """The gradient factors at q, k and v, given which of them depend on the input.

        softmax(q k^T) v is two products; a product with one constant factor is linear in
        the other, which takes all of its relevance (as the same product written out with
        matmuls is explained): a constant query (a learned probe, a decoder's constant
        tokens in cross-attention) leaves the keys the whole of the scores' share."""
        if self.weights_constant:
            return 0.0, 0.0, 1.0
        half = self.operand_share
        weights = half if v else 1.0  # of A v, the weights' share
        return (weights * (half if k else 1.0), weights * (half if q else 1.0),
                half if (q or k) else 1.0)

    def softmax(self, fn: Any) -> Any:
        """The callable of an attention softmax: AttnLRP's Taylor rule at its input is the
        softmax's own gradient (held weights take no relevance in `product`, so what
        CP-LRP does here never matters)."""
        return fn

    def similarity(self, x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
        """Cosine similarity of two activations: norms held, products split uniformly."""
        return cosine_similarity(x1, x2, dim, eps)

    def product(self, fn: Any, a: Tensor, b: Tensor, *args: Any, weights: int | None = None,
                **kwargs: Any) -> Tensor:
        """fn(a, b) for a bilinear fn (matmul, element-wise mul) of two activations;
        `weights`: which operand (0, 1) holds attention weights, if one does. An operand
        that turns out constant (made from parameters and the input's shape only, such as
        a learned probe expanded to the batch) leaves the other all of the relevance: the
        product is linear in it."""
        shares = [self.operand_share, self.operand_share]
        if self.weights_constant and weights is not None:
            shares[weights], shares[1 - weights] = 0.0, 1.0
        elif not a.requires_grad or not b.requires_grad:
            shares = [1.0, 1.0]
        return fn(scaled(a, shares[0]), scaled(b, shares[1]), *args, **kwargs)


@dataclass(frozen=True)
class AttnLRP(AttentionRule):
    """Softmax by its Taylor rule, bilinear products split uniformly (AttnLRP)."""

    name: ClassVar[str] = "attnlrp"


@dataclass(frozen=True)
class CPLRP(AttentionRule):
    """Attention weights held constant (Ali et al. 2022); other products split uniformly."""

    name: ClassVar[str] = "cp_lrp"
    weights_constant: bool = True


def is_causal_mask(mask: Tensor, queries: int, keys: int) -> bool:
    """Whether an attention mask (bool: True = attend; float: 0 = attend, a huge negative
    = masked) is the causal mask of `queries` x `keys`, the same for every batch and head."""
    if queries != keys or mask.dim() < 2 or mask.shape[-2:] != (queries, keys):
        return False
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            return False  # a bias, not a mask
    else:
        return False
    causal = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).tril()
    return bool((allowed == causal).all())


class CosineRule(torch.autograd.Function):
    """cos(x1, x2) = x1 . x2 / (|x1| |x2|) with the norms held constant, each product term
    split half and half: in gradient form, half the gradient at fixed norms."""

    @staticmethod
    def forward(ctx: Any, x1: Tensor, x2: Tensor, dim: int,  # type: ignore[override]
                eps: float) -> Tensor:
        n1 = x1.norm(dim=dim, keepdim=True)
        n2 = x2.norm(dim=dim, keepdim=True)
        den = n1.clamp_min(eps) * n2.clamp_min(eps)
        ctx.save_for_backward(x1, x2, den)
        ctx.dim = dim
        return (x1 * x2).sum(dim) / den.squeeze(dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x1, x2, den = ctx.saved_tensors
        g = (grad.unsqueeze(ctx.dim) / den) * 0.5
        return g * x2, g * x1, None, None


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """F.cosine_similarity's value with relprop's rule (broadcasting as F's)."""
    x1, x2 = torch.broadcast_tensors(x1, x2)
    return CosineRule.apply(x1, x2, dim, eps)
