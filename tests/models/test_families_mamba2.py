"""Mamba2 explained unchanged as MambaLRP (issue 19), on its pure-PyTorch path (no CUDA
kernels, the chunked SSD scan): Delta (softplus, clamp), exp(Delta A) with its segment
sums, B and C held constant, so every einsum of the scan is linear in its input x; the
gated RMSNorm's y * silu(z) uniform; SiLU and RMSNorm identity; the causal conv1d a
linear layer. Against the explicit float64 reference (tests/reference_mamba2.py, a
sequential scan), and the family contract.

Hugging Face's Mamba2 runs the scan, the norms and the residual in float32 inside the
float64 model and returns float32 logits: the comparisons allow that rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_families import IDS, LEFT_PADDED, check_contract

import relprop
from relprop.errors import UnsupportedOperationError

ref = pytest.importorskip("reference_mamba2")


def _deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def mamba2() -> tuple[torch.nn.Module, relprop.Explainer]:
    """One model and one explainer (one trace) for the reference checks."""
    model = ref.tiny_mamba2(0)
    return model, relprop.Explainer(model, "attnlrp", record=True)


def test_mamba2_forward_of_the_reference_is_the_models(mamba2) -> None:
    model, _ = mamba2
    with torch.no_grad():
        hf = model(IDS).logits
    torch.testing.assert_close(ref.mamba2_forward(model, IDS).logits.float(), hf, rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("rows, position", [(2, 6), (2, 3), (1, 6)])
def test_mamba2_matches_reference(mamba2, rows: int, position: int) -> None:
    """attnlrp's defaults (epsilon -> 0, sums unstabilised), batch 2 and batch 1, with a
    ledger: within 1e-6 of max|R| of the reference; what did not reach the tokens is what
    the conv1d's bias took (the only bias)."""
    model, explainer = mamba2
    ids = IDS[:rows]
    got = explainer(ids, target=(position, 4))
    want = ref.mamba2_relevance(model, ids, position=position, token=4)
    assert _deviation(got.embeddings, want) < 1e-6
    torch.testing.assert_close(got.relevance, want.sum(-1), rtol=0,
                               atol=1e-6 * float(want.abs().max()))
    assert torch.all(got.relevance[:, position + 1:] == 0)  # causal
    # what did not reach the tokens is what the conv1d's bias took, up to the float32
    # scan's rounding (about 1e-7 of the relevance that crosses it)
    totals = got.ledger.totals()
    scale = float(got.embeddings.abs().sum((1, 2)).max() + totals["bias"].abs().max())
    torch.testing.assert_close(totals["bias"], got.explained - got.relevance.sum(-1),
                               rtol=0, atol=1e-6 * scale)
    assert float(totals["bias"].abs().min()) > 1e-3 * scale
    booked = {e.node for e in got.ledger if float(e.bias.abs().max()) > 0}
    assert booked and all(n.startswith("conv1d") for n in booked), booked


def test_mamba2_holds_its_scan_parameters(mamba2) -> None:
    """What the program explains: per layer, the four einsums of the scan that carry x
    (linear in it: gradient, LRP-0) and the uniform gate; what only Delta, B and C compute
    (softplus, clamp, exp, cumsum, the segment sums' masks, C B^T, B and C repeated over
    the heads) is held, so it has no step."""
    _, explainer = mamba2
    steps = explainer.describe(IDS).steps
    ops = [s.op.removeprefix("aten.").split(" ")[0] for s in steps]
    assert ops.count("einsum") == 8
    assert all(s.kind == "gradient" for s in steps if "einsum" in s.op)
    assert sum("bilinear" in s.op for s in steps) == 2  # y * silu(z), per layer
    assert not {"softplus", "clamp", "exp", "cumsum", "masked_fill",
                "repeat_interleave"} & set(ops), ops


def test_mamba2_runs_unchanged() -> None:
    """The contract, bias-free and left-padded (the mixer's input and the conv1d's output
    masked): nothing leaks (no softmax; every rule conservative), nothing is booked as
    bias, padded tokens 0. In float32, the dtype its scan runs in anyway: the ledger's
    float32 sums inside a float64 model would round beyond the contract's float64
    tolerance (the float64 reference checks above hold to 1e-6)."""
    model = ref.tiny_mamba2(1, use_conv_bias=False).float()
    check_contract(model, IDS, 4, {"attention_mask": LEFT_PADDED}, padded=LEFT_PADDED == 0,
                   bias_free=True, softmax=False)


class _SharedSplit(torch.nn.Module):
    """Mamba2's layout, small: in_proj(u) -> (z, xbc, dt), conv(xbc) -> (x, B, C),
    Delta = clamp(softplus(dt)), y = x Delta scaled by C.B, gated by silu(z). With
    `b_into_layer`, B also enters a layer (no scan parameter: nothing may be held)."""

    def __init__(self, b_into_layer: bool) -> None:
        super().__init__()
        self.b_into_layer = b_into_layer
        self.in_proj = torch.nn.Linear(4, 14, bias=False)
        self.conv = torch.nn.Linear(8, 8, bias=False)  # (the conv1d: a layer)
        self.out = torch.nn.Linear(4, 3, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z, xbc, dt = self.in_proj(u).split([4, 8, 2], -1)
        x, b, c = self.conv(xbc).split([4, 2, 2], -1)
        delta = F.softplus(dt).clamp(0.05, 2.0).repeat_interleave(2, -1)
        y = (x * delta) * torch.einsum("bn,bn->b", c, b)[:, None]
        if self.b_into_layer:
            y = y + self.out(b.repeat(1, 2))[:, :1]
        return self.out(y * F.silu(z))


def test_a_shared_split_holds_the_scan_inputs_siblings() -> None:
    """x (the piece Delta scales) keeps its relevance, B and C (its siblings) and dt are
    held: the einsum C.B is a constant, and the explanation balances."""
    torch.manual_seed(0)
    model = _SharedSplit(False).double()
    u = torch.randn(3, 4, dtype=torch.float64)
    expl = relprop.Explainer(model, "attnlrp", record=True)(u, target=1)
    torch.testing.assert_close(expl.relevance.sum(-1), expl.explained, rtol=0, atol=1e-12)
    layers = expl.layers
    assert float(layers["conv"][:, 4:].abs().max()) == 0  # B and C: no relevance
    assert float(layers["conv"][:, :4].abs().max()) > 0
    assert float(layers["in_proj"][:, 12:].abs().max()) == 0  # dt: none


def test_a_scan_whose_parameters_enter_a_layer_is_refused() -> None:
    """Where the reading does not fit, nothing is held and the scan is refused at its
    first op without a rule (the clamp of Delta), not explained wrong."""
    torch.manual_seed(0)
    model = _SharedSplit(True).double()
    with pytest.raises(UnsupportedOperationError, match="clamp"):
        relprop.Explainer(model, "attnlrp")(torch.randn(3, 4, dtype=torch.float64), target=1)
