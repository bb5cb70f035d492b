"""relprop.evaluate: region perturbation by hand and against Quantus, AOPC/ABPC, randomisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop.evaluate as ev

# --- fixtures and helpers ------------------------------------------------------------------


def summing_model() -> nn.Module:
    """f_0(x) = sum(x), f_1(x) = 2 sum(x) on (B, 2, 3, 3) images: every pixel counts alike."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 2, bias=False))
    with torch.no_grad():
        model[1].weight[0] = 1.0
        model[1].weight[1] = 2.0
    return model.eval()


def hand_image() -> torch.Tensor:
    """Channel 0 all 1, channel 1 all 2: each pixel adds 3 to sum(x), so f_0(x) = 27."""
    return torch.cat([torch.ones(1, 1, 3, 3), torch.full((1, 1, 3, 3), 2.0)], 1)


# Relevance on the 3x3 grid with patch_size 2: four regions, two of them partial,
#   R0 = rows 0-1 x cols 0-1 (4 px, score 4)   R1 = rows 0-1 x col 2 (2 px, score 10)
#   R2 = row 2 x cols 0-1    (2 px, score 6)   R3 = row 2 x col 2    (1 px, score -1)
# MoRF: R1, R2, R0, R3; LeRF: R3, R0, R2, R1.
HAND_RELEVANCE = torch.tensor([[[1.0, 1, 5], [1, 1, 5], [3, 3, -1]]])


class SmallCNN(nn.Module):
    """Registration order (fc first) differs from execution order on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 4)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.fc(self.head(self.conv2(torch.relu(self.conv1(x)))))


class BNDropCNN(nn.Module):
    """Has state that a forward in train mode would change (BatchNorm) or randomise (dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(h.flatten(1)))


def snapshot(model: nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer as raw bytes, plus the train/eval flag of each module."""
    state = {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}
    state.update({f"{n}.training": bytes([m.training]) for n, m in model.named_modules()})
    return state


def gradient_x_input(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    return ev.baselines(model, x, target)["gradient_x_input"]


# --- 1. hand-computable cases --------------------------------------------------------------


@pytest.mark.parametrize(("order", "fill", "expected"), [
    # fill 0: removing a pixel takes 3 from f_0
    ("morf", 0.0, [27, 21, 15, 3, 0]),
    ("lerf", 0.0, [27, 24, 12, 6, 0]),
    # fill 0.5: a removed pixel still adds 2 x 0.5 = 1, so it takes 2 from f_0
    ("morf", 0.5, [27, 23, 19, 11, 9]),
    ("lerf", 0.5, [27, 25, 17, 13, 9]),
])
def test_curve_by_hand(order, fill, expected) -> None:
    curve = ev.region_perturbation(summing_model(), hand_image(), HAND_RELEVANCE, 0,
                                   patch_size=2, steps=4, order=order, fill=fill)
    assert curve.shape == (1, 5)
    torch.testing.assert_close(curve, torch.tensor([expected], dtype=torch.float32))


def test_curve_by_hand_per_sample_targets_and_relevance() -> None:
    """Sample 1 explains f_1 = 2 sum(x) with negated relevance: its MoRF order is sample 0's
    LeRF order (R3, R0, R2, R1), so its curve is 2 x [27, 24, 12, 6, 0]."""
    x = hand_image().repeat(2, 1, 1, 1)
    relevance = torch.cat([HAND_RELEVANCE, -HAND_RELEVANCE])
    curve = ev.region_perturbation(summing_model(), x, relevance, torch.tensor([0, 1]),
                                   patch_size=2, steps=4, order="morf", fill=0.0)
    torch.testing.assert_close(curve, torch.tensor([[27.0, 21, 15, 3, 0], [54, 48, 24, 12, 0]]))


def test_relevance_shapes_sum_over_channels() -> None:
    """(B, C, H, W), (B, 1, H, W) and (B, H, W) relevance rank regions by the same sums."""
    per_channel = HAND_RELEVANCE[:, None].repeat(1, 2, 1, 1) / 2  # channel sum = HAND_RELEVANCE
    per_channel[:, 0] += torch.tensor([[0.0, 0, 7], [0, 0, -7], [0, 0, 0]])  # cancels in R1
    for relevance in (per_channel, HAND_RELEVANCE[:, None], HAND_RELEVANCE):
        curve = ev.region_perturbation(summing_model(), hand_image(), relevance, 0,
                                       patch_size=2, steps=4, fill=0.0)
        torch.testing.assert_close(curve, torch.tensor([[27.0, 21, 15, 3, 0]]))


def test_steps_beyond_regions_are_clamped() -> None:
    """Documented choice: steps > n_regions is clamped, the curve ends with all regions gone."""
    args = (summing_model(), hand_image(), HAND_RELEVANCE, 0)
    full = ev.region_perturbation(*args, patch_size=2, steps=4, fill=0.0)
    clamped = ev.region_perturbation(*args, patch_size=2, steps=100, fill=0.0)
    short = ev.region_perturbation(*args, patch_size=2, steps=2, fill=0.0)
    assert clamped.shape == (1, 5) and torch.equal(clamped, full)
    assert short.shape == (1, 3) and torch.equal(short, full[:, :3])


def test_aopc_and_abpc_by_hand() -> None:
    morf = torch.tensor([[27.0, 21, 15, 3, 0], [4, 4, 4, 4, 4]])
    lerf = torch.tensor([[27.0, 24, 12, 6, 0], [4, 5, 6, 7, 8]])
    # (0 + 6 + 12 + 24 + 27) / 5: L + 1 = 5 terms, the k = 0 term included
    torch.testing.assert_close(ev.aopc(morf), torch.tensor([13.8, 0.0]))
    # (0 + 3 - 3 + 3 + 0) / 5 and (0 + 1 + 2 + 3 + 4) / 5
    torch.testing.assert_close(ev.abpc(morf, lerf), torch.tensor([0.6, 2.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        ev.abpc(morf, lerf[:, :3])


def test_spearman_ties_get_average_ranks() -> None:
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    a = torch.tensor([[1.0, 2, 2, 3], [4, 3, 2, 1]])
    b = torch.tensor([[1.0, 2, 3, 4], [1, 2, 3, 4]])
    torch.testing.assert_close(ev.spearman(a, b), torch.tensor([0.9**0.5, -1.0],
                                                               dtype=torch.float64))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"order": "random"}, "order"),
    ({"fill": "black"}, "fill"),
    ({"patch_size": 0}, "patch_size"),
    ({"steps": -1}, "steps"),
    ({"target": 2}, "out of range"),
    ({"relevance": torch.zeros(1, 4, 4)}, "relevance has shape"),
])
def test_bad_arguments_are_named(kwargs, message) -> None:
    args = {"model": summing_model(), "x": hand_image(), "relevance": HAND_RELEVANCE,
            "target": 0, "patch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ev.region_perturbation(**args)


# --- 2. determinism, batching, nothing modified --------------------------------------------


def test_uniform_fill_is_seeded_and_within_sample_range() -> None:
    model, x = SmallCNN().eval(), torch.randn(3, 3, 12, 12)
    relevance = torch.randn(3, 3, 12, 12)
    rng_before = torch.get_rng_state()
    run = lambda seed: ev.region_perturbation(model, x, relevance, 1, patch_size=4, seed=seed)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, 1:], c[:, 1:])
    assert torch.equal(a[:, 0], c[:, 0])
    assert torch.equal(torch.get_rng_state(), rng_before)  # a Generator, not the global RNG
    # a model that reads one pixel exposes the fill: it lies in [min, max) of its own sample
    probe = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 1, bias=False))
    with torch.no_grad():
        probe[1].weight.zero_()
        probe[1].weight[0, 5 * 12 + 7] = 1.0  # channel 0, pixel (5, 7)
    x = torch.stack([torch.rand(3, 12, 12) * 0.1 + 5, torch.rand(3, 12, 12) * 0.1 - 5])
    seen = ev.region_perturbation(probe, x, relevance[:2], 0, patch_size=4)[:, -1]
    lo, hi = x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))
    assert (seen >= lo).all() and (seen < hi).all() and not torch.equal(seen, x[:, 0, 5, 7])


@pytest.mark.parametrize("fill", ["uniform", -0.5])
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_batch_equals_each_sample_alone(fill, order) -> None:
    model = SmallCNN().eval()
    x, relevance = torch.randn(4, 3, 10, 10), torch.randn(4, 3, 10, 10)
    target = torch.tensor([0, 3, 1, 2])
    kwargs = {"patch_size": 3, "steps": 12, "order": order, "fill": fill, "seed": 5}
    batched = ev.region_perturbation(model, x, relevance, target, **kwargs)
    assert batched.shape == (4, 13)
    alone = torch.cat([ev.region_perturbation(model, x[i:i + 1], relevance[i:i + 1],
                                              target[i:i + 1], **kwargs) for i in range(4)])
    torch.testing.assert_close(batched, alone)
    # several steps per forward pass (batch_size=20: 5 steps of 4 images) change nothing
    chunked = ev.region_perturbation(model, x, relevance, target, batch_size=20, **kwargs)
    torch.testing.assert_close(chunked, batched)


def test_model_and_input_unchanged_in_train_mode() -> None:
    """The curve uses inference semantics; BatchNorm statistics and modes survive untouched."""
    model = BNDropCNN().train()
    before = snapshot(model)
    x, relevance = torch.randn(3, 3, 8, 8, requires_grad=True), torch.randn(3, 3, 8, 8)
    x_before, relevance_before = x.detach().clone(), relevance.clone()
    a = ev.region_perturbation(model, x, relevance, 2, patch_size=4, steps=3)
    b = ev.region_perturbation(model, x, relevance, 2, patch_size=4, steps=3)
    assert torch.equal(a, b)  # dropout off
    model.eval()
    torch.testing.assert_close(a[:, 0], model(x_before)[:, 2])
    model.train()
    assert snapshot(model) == before
    assert torch.equal(x.detach(), x_before) and torch.equal(relevance, relevance_before)
    assert x.grad is None and not a.requires_grad


def test_baselines() -> None:
    model = summing_model()
    x = torch.randn(2, 2, 3, 3)
    out = ev.baselines(model, x, torch.tensor([0, 1]), seed=3)
    assert set(out) == {"gradient", "gradient_x_input", "random"}
    # f_0 = sum(x), f_1 = 2 sum(x): gradients 1 and 2 everywhere
    expected = torch.stack([torch.ones(2, 3, 3), torch.full((2, 3, 3), 2.0)])
    torch.testing.assert_close(out["gradient"], expected)
    torch.testing.assert_close(out["gradient_x_input"], expected * x)
    again = ev.baselines(model, x, torch.tensor([0, 1]), seed=3)["random"]
    other = ev.baselines(model, x, torch.tensor([0, 1]), seed=4)["random"]
    assert out["random"].shape == x.shape and torch.equal(out["random"], again)
    assert not torch.equal(out["random"], other)
    assert ((out["random"] >= 0) & (out["random"] < 1)).all()
    assert all(p.grad is None for p in model.parameters())


# --- 3. agreement with Quantus -------------------------------------------------------------
#
# quantus.RegionPerturbation (0.6.0, metrics/faithfulness/region_perturbation.py) returns, per
# sample, [f(x) - f(x_k) for k = 1..regions_evaluation]: so quantus[:, k - 1] must equal
# curve[:, 0] - curve[:, k]. With abs=False and normalise=False it sums the attribution over
# each patch x all channels, argsorts -sums (morf) or sums (lerf) and replaces the patch in
# all channels with perturb_baseline; softmax=False makes it read the logits, as relprop does.
# Both run float32, one forward pass of B images per step, on bit-identical perturbed inputs,
# and subtract in float32: so the results must be *equal*, not merely close. Random relevance
# makes ties between region scores (where sort algorithms may differ) a null event.
#
# Grids differ in one documented way: Quantus centres its grid (pads H % p with floor/ceil on
# both sides), relprop anchors it at the top-left pixel. For H divisible by the patch size the
# grids coincide; otherwise we give relprop the image Quantus sees (x padded on the same
# sides, relevance padded with zeros, the model wrapped to crop the padding back off): the
# same regions, and the curves must again be equal.


class Crop(nn.Module):
    def __init__(self, before: int, after: int) -> None:
        super().__init__()
        self.before, self.after = before, after

    def forward(self, x):
        return x[..., self.before:x.shape[-2] - self.after, self.before:x.shape[-1] - self.after]


@pytest.mark.parametrize(("size", "patch", "order", "baseline"), [
    (12, 4, "morf", 0.3),
    (12, 4, "lerf", 0.3),
    (12, 3, "morf", "black"),  # per-sample min of x; every sample's min is set to -4 below
    (10, 4, "morf", -1.0),  # Quantus pads (1, 1)
    (11, 4, "lerf", 0.0),  # Quantus pads (0, 1)
    (13, 5, "morf", 0.5),  # Quantus pads (1, 1)
])
def test_agrees_with_quantus(quantus, size, patch, order, baseline) -> None:
    torch.manual_seed(size + patch)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(3),
                          nn.Flatten(), nn.Linear(36, 5)).eval()
    x = torch.randn(3, 3, size, size).clamp(min=-3.5)
    x[:, 1, 0, 0] = -4.0  # every sample's minimum, so Quantus' "black" is the constant -4
    relevance = torch.randn(3, 3, size, size)
    assert (x.amin(dim=(1, 2, 3)) == -4.0).all()
    y = np.array([0, 2, 4])
    n_regions = (-(-size // patch)) ** 2
    metric = quantus.RegionPerturbation(
        patch_size=patch, order=order, regions_evaluation=n_regions, abs=False,
        normalise=False, perturb_baseline=baseline, disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y,
                               a_batch=relevance.numpy(), softmax=False, device="cpu",
                               channel_first=True))
    pad = -size % patch
    before, after = pad // 2, pad - pad // 2
    padded = (before, after, before, after)
    curve = ev.region_perturbation(
        nn.Sequential(Crop(before, after), model), F.pad(x, padded, mode="replicate"),
        F.pad(relevance, padded), torch.from_numpy(y), patch_size=patch, steps=n_regions,
        order=order, fill=-4.0 if baseline == "black" else baseline)
    ours = (curve[:, :1] - curve[:, 1:]).numpy()
    assert theirs.shape == ours.shape == (3, n_regions)
    np.testing.assert_array_equal(ours, theirs)


# --- 4. cascading model randomisation ------------------------------------------------------


def test_randomization_check_gradient_x_input() -> None:
    model = SmallCNN().eval()
    before = snapshot(model)
    x = torch.randn(4, 3, 12, 12)
    rng_before = torch.get_rng_state()
    result = ev.randomization_check(model, x, gradient_x_input, 1, seed=0)
    # reverse execution order, not registration order (fc is registered first)
    assert result["layers"] == ["fc", "conv2", "conv1"]
    spearman = result["spearman"]
    assert spearman.shape == (3, 4)
    # step 0: nothing randomised, a deterministic explainer agrees with itself
    torch.testing.assert_close(result["spearman_before"], torch.ones(4, dtype=torch.float64))
    # randomising from the top breaks the ranking; x's factor keeps it positive (Adebayo)
    assert (spearman < 0.8).all() and (spearman > 0).all()
    # the user's model, its modes and the global RNG are untouched
    assert snapshot(model) == before
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = ev.randomization_check(model, x, gradient_x_input, 1, seed=0)
    assert torch.equal(again["spearman"], spearman)
    other = ev.randomization_check(model, x, gradient_x_input, 1, seed=1)
    assert not torch.equal(other["spearman"], spearman)


def test_randomization_check_flags_model_blind_explanation() -> None:
    """An 'explanation' that ignores the model (|x|, an edge-detector stand-in) stays at 1."""
    result = ev.randomization_check(SmallCNN().eval(), torch.randn(2, 3, 12, 12),
                                    lambda model, x, target: x.abs(), 0)
    torch.testing.assert_close(result["spearman"], torch.ones(3, 2, dtype=torch.float64))


def test_randomization_check_reinitialises_only_the_top_layers() -> None:
    """After the first step only fc differs from the original; the explainer sees exactly it."""
    model = SmallCNN().eval()
    seen: list[dict[str, torch.Tensor]] = []

    def explain(m, x, target):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return gradient_x_input(m, x, target)

    ev.randomization_check(model, torch.randn(2, 3, 12, 12), explain, 0)
    original = model.state_dict()
    assert len(seen) == 5  # original, repeat, then one per layer
    changed = [{k.split(".")[0] for k in original if not torch.equal(s[k], original[k])}
               for s in seen]
    assert changed == [set(), set(), {"fc"}, {"fc", "conv2"}, {"fc", "conv2", "conv1"}]
    bound = 32**-0.5  # default init range of fc: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert seen[2]["fc.weight"].abs().max() <= bound and seen[2]["fc.bias"].abs().max() <= bound
