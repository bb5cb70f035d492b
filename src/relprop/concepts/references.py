"""Reading a collection back (relprop.concepts.collect): the top samples of a channel, the
mean relevance of every channel per class, and for a reference sample the concept's
heatmap and a crop around where its relevance sits.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..dataset.manifest import read_manifest
from ..errors import RelpropError
from ..explain import Explainer
from ..trace import TRACE_LOCK, preserved
from .collect import MEASURES, REFERENCES_FILE
from .sites import feature_axis, resolve, unfused


@dataclass
class Top:
    """A channel's reference samples, best first: dataset indices, scores, and the flat
    position (over the layer's positions) where each sample's score peaks."""

    indices: Tensor
    scores: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return len(self.indices)


def load(out_dir: str | Path) -> References:
    """The collection relprop.concepts.collect wrote to out_dir (after it finished)."""
    return References(out_dir)


class References:
    """`top(layer, channel, by, n)`, `class_relevance(layer)`; `manifest` describes the run
    (model, composite, target, layers and their widths)."""

    def __init__(self, out_dir: str | Path) -> None:
        from safetensors.torch import load_file

        self.out_dir = Path(out_dir)
        self.manifest: dict[str, Any] = read_manifest(self.out_dir)
        path = self.out_dir / REFERENCES_FILE
        if not path.exists():
            raise RelpropError(f"{path} is missing (is {out_dir} a concepts collection?)")
        self._t = load_file(str(path))
        self._rows = {r["index"]: r for r in self.manifest["samples"]}

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or [])

    def channels(self, layer: str) -> int:
        return int(self.manifest["layers"][self._layer(layer)]["channels"])

    def _layer(self, layer: str) -> str:
        if layer not in self.manifest["layers"]:
            raise RelpropError(f"layer {layer!r} was not collected; these were: "
                               f"{', '.join(self.layers)}")
        return layer

    def top(self, layer: str, channel: int, by: str = "relevance", n: int | None = None) -> Top:
        """The samples where `channel` of `layer` matters most: by="relevance" (sum over
        positions), "relevance_max", "activation" or "activation_max"."""
        if by not in MEASURES:
            raise RelpropError(f"by={by!r}: choose {', '.join(MEASURES)}")
        key = f"{self._layer(layer)}/{by}"
        width = self.channels(layer)
        if not -width <= channel < width:
            raise RelpropError(f"channel {channel}: {layer} has {width}")
        n = self.manifest["n"] if n is None else n
        return Top(self._t[key + "/index"][:n, channel], self._t[key + "/score"][:n, channel],
                   self._t[key + "/position"][:n, channel])

    def label(self, index: int) -> int:
        return int(self._rows[int(index)]["label"])

    def target(self, index: int) -> int:
        return int(self._rows[int(index)]["target"])

    def path(self, index: int) -> str | None:
        paths = self.manifest.get("paths")
        return paths[int(index)] if paths else None

    def class_relevance(self, layer: str) -> tuple[list[int], Tensor]:
        """Classes (of the explained target) and (classes, C): each channel's mean relevance
        over the samples explained for that class."""
        classes = self._t["class"].tolist()
        counts = self._t["class_count"].double()
        return classes, self._t[f"{self._layer(layer)}/class_sum"] / counts[:, None]

    def __repr__(self) -> str:
        return (f"References({str(self.out_dir)!r}, {len(self._rows)} samples, layers="
                f"{self.layers}, n={self.manifest['n']})")


_GRADIENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def receptive_field(model: nn.Module | Explainer, x: Tensor, layer: str, channel: int,
                    position: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the input pixels the unit (channel, flat position) of
    `layer` reads in x (1, C, H, W): where its gradient with respect to x is not zero
    (taken through LRP-0, the plain gradient, whatever composite explains the model)."""
    model = model.model if isinstance(model, Explainer) else model
    explainer = _GRADIENT.get(model)
    if explainer is None:  # traced once per model
        explainer = _GRADIENT[model] = Explainer(model, "lrp0", stabilizer=0.0)
    x = x.detach().clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        program = explainer._cache.get((x,), {})
    site = resolve(program, layer)
    program = unfused(program, [site.step])
    values: dict[str, Tensor] = {}

    def keep(value: Tensor, shadow: Any) -> tuple[Tensor, Any]:
        values["v"] = value
        return value, shadow

    with TRACE_LOCK.shared(), preserved(model), torch.inference_mode(False), \
            torch.enable_grad():
        program.run([x], conditions={site.step: keep})
        v = values["v"]
        axis = feature_axis(site, v)
        unit = v.movedim(axis, 1).reshape(v.shape[0], v.shape[axis], -1)[0, channel, position]
        (g,) = torch.autograd.grad(unit, x, allow_unused=True)
    if g is None or x.dim() != 4:
        return 0, x.shape[-2], 0, x.shape[-1]
    nz = g.abs().sum(1)[0].nonzero()
    if len(nz) == 0:
        return 0, x.shape[-2], 0, x.shape[-1]
    return (int(nz[:, 0].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].min()),
            int(nz[:, 1].max()) + 1)
