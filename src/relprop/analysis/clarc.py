"""Projective Class Artifact Compensation (P-ClArC, Anders et al. 2022): remove a found
artifact's direction from a model, without retraining.

At one layer, the artifact's direction v is the difference of the mean activations of
samples with the artifact and of clean samples (a concept activation vector), normalised.
The corrected model is a copy with that layer's output a replaced by
a - v v^T (a - z), z the clean mean: the component along v is set to the clean samples'
value and everything orthogonal to v is kept. The original model is not touched.

The projection is one relprop leaf module ("identity": relevance passes through it as it
arrives), so the corrected model is explained like any other: what the layers after it no
longer see of the artifact they no longer give relevance to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import RelpropError


class Projection(nn.Module):
    """a -> a - v v^T (a - z) on each sample's flattened activation."""

    def __init__(self, direction: Tensor, clean_mean: Tensor) -> None:
        super().__init__()
        v = direction.flatten().float()
        self.register_buffer("direction", v / v.norm().clamp_min(1e-12))
        self.register_buffer("clean_mean", clean_mean.flatten().float())

    def forward(self, a: Tensor) -> Tensor:
        flat = a.flatten(1)
        along = (flat - self.clean_mean) @ self.direction
        return (flat - along[:, None] * self.direction).reshape(a.shape)


class Corrected(nn.Module):
    """A layer followed by its projection (what replaces the layer in the corrected copy)."""

    def __init__(self, layer: nn.Module, projection: Projection) -> None:
        super().__init__()
        self.layer = layer
        self.projection = projection

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.projection(self.layer(*args, **kwargs))


def _register() -> None:
    from ..registry import register_module

    register_module(Projection, "identity")


@dataclass
class ClarcResult:
    """model: the corrected copy; direction and clean_mean at `layer`; report: measurements
    before and after (filled by `evaluate`, or by clarc when given evaluation data)."""

    model: nn.Module
    layer: str
    direction: Tensor
    clean_mean: Tensor
    separation: float  # mean projection onto v: artifact samples minus clean samples
    report: dict[str, dict[str, float]] = field(default_factory=dict)


def clarc(model: nn.Module, layer: str, artifact_samples: Tensor, clean_samples: Tensor, *,
          batch_size: int = 256, **evaluate_args: Any) -> ClarcResult:
    """Projective ClArC: a corrected copy of `model` whose module `layer` (a name from
    model.named_modules()) has the artifact's direction projected out towards the clean mean.

    artifact_samples / clean_samples: inputs with and without the artifact (e.g. the two
    clusters SpRAy found). With evaluation data (keywords of ClarcResult.evaluate via
    `evaluate`: clean=(x, y), marked=(x, y), mask=..., target=...) the report is filled."""
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        raise RelpropError(f"layer {layer!r} is not a submodule of the model; some names: "
                           f"{', '.join(n for n in list(modules)[1:12])}")
    if len(artifact_samples) == 0 or len(clean_samples) == 0:
        raise RelpropError("clarc needs at least one artifact sample and one clean sample")
    act_artifact = _activations(model, modules[layer], artifact_samples, batch_size)
    act_clean = _activations(model, modules[layer], clean_samples, batch_size)
    mean_clean = act_clean.mean(0)
    direction = act_artifact.mean(0) - mean_clean
    if direction.norm() == 0:
        raise RelpropError(f"artifact and clean samples have the same mean activation at "
                           f"{layer!r}: no direction to remove")
    corrected = copy.deepcopy(model)
    projection = Projection(direction, mean_clean).to(next(model.parameters()).device)
    _replace(corrected, layer, Corrected(_get(corrected, layer), projection))
    _register()
    v = projection.direction.cpu()
    separation = float(((act_artifact.flatten(1) - mean_clean.flatten()) @ v).mean()
                       - ((act_clean.flatten(1) - mean_clean.flatten()) @ v).mean())
    result = ClarcResult(corrected.eval(), layer, direction, mean_clean, separation)
    if evaluate_args:
        result.report = evaluate(model, corrected, **evaluate_args)
    return result


@torch.no_grad()
def _activations(model: nn.Module, module: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    kept: list[Tensor] = []
    hook = module.register_forward_hook(lambda _m, _i, out: kept.append(out.detach().cpu()))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(kept).float()


def _get(model: nn.Module, path: str) -> nn.Module:
    return dict(model.named_modules())[path]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, name, new)


def evaluate(before: nn.Module, after: nn.Module, *, clean: tuple[Tensor, Tensor],
             marked: tuple[Tensor, Tensor], mask: Tensor | None = None,
             target: int | None = None, composite: str = "epsilon_gamma_box",
             **params: Any) -> dict[str, dict[str, float]]:
    """Accuracy on clean and on marked samples, and (with `mask`, an (H, W) bool of the
    artifact's region) the share of positive relevance on that region for the marked
    samples, explaining `target` (default: each sample's label); before and after."""
    report: dict[str, dict[str, float]] = {}
    for name, model in (("before", before), ("after", after)):
        row = {"accuracy_clean": _accuracy(model, *clean),
               "accuracy_marked": _accuracy(model, *marked)}
        if mask is not None:
            row["artifact_relevance"] = artifact_share(model, marked[0], mask,
                                                       marked[1] if target is None else target,
                                                       composite, **params)
        report[name] = row
    return report


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    device = next(model.parameters()).device
    pred = torch.cat([model(x[i:i + 512].to(device)).argmax(1).cpu()
                      for i in range(0, len(x), 512)])
    return (pred == y).float().mean().item()


def artifact_share(model: nn.Module, x: Tensor, mask: Tensor, target: int | Tensor,
                   composite: str = "epsilon_gamma_box", **params: Any) -> float:
    """Mean over samples of (positive relevance inside mask) / (positive relevance)."""
    from ..explain import Explainer

    _register()
    return region_share(Explainer(model, composite, **params)(x, target=target).relevance,
                        mask)


def region_share(relevance: Tensor, mask: Tensor) -> float:
    """Mean over samples of the share of positive relevance (channels summed) inside mask."""
    pos = relevance.detach().clamp_min(0).sum(1)
    inside = (pos * mask.to(pos.device)).sum((1, 2))
    return (inside / pos.sum((1, 2)).clamp_min(1e-12)).mean().item()
