"""Hugging Face image classifiers explain unchanged, checked like the torchvision zoo.

HF's ResNet adds its shortcut in place (`hidden_state += residual`), MobileNetV2
pads ("same" as TensorFlow) and ends in an in-place dropout, EfficientNet pads with
nn.ZeroPad2d, ConvNeXt has channels-first LayerNorm and layer scale. Tiny models,
built offline from their config classes, in eval mode.

HF forwards return an output object (ImageClassifierOutput...), and they do not
trace with torch.fx, so relprop traces them with torch.export on the first input.
The models are wrapped to return `.logits` (what relprop explains). torch.export
takes seconds per model: each model is exported once here and the graph reused
(a fresh copy for every Explainer), and the tests change the parameters in place
(the explanation reads them at every run).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from checks import (
    assert_bias_free_epsilon_conserves,
    assert_every_composite_runs,
    assert_ledger_accounts_for_biases,
)
from torch import nn
from zoo import bias_free, with_random_biases

import relprop
from relprop.errors import TraceError
from relprop.trace import TracedModel

transformers = pytest.importorskip("transformers")

SIDE = 16


class Logits(nn.Module):
    """The tensor relprop explains: the classifier's `.logits`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="bottleneck", num_labels=3)
    return transformers.ResNetForImageClassification(config)


def _mobilenet_v2() -> nn.Module:
    config = transformers.MobileNetV2Config(depth_multiplier=0.25, image_size=SIDE,
                                            num_labels=3)
    return transformers.MobileNetV2ForImageClassification(config)


def _efficientnet() -> nn.Module:
    # three stages; hidden_dim must equal the top conv's width: round_filters(1280) at
    # width 0.1; block 1 pads its stride-2 depthwise conv symmetrically, block 2 not
    config = transformers.EfficientNetConfig(
        width_coefficient=0.1, depth_coefficient=0.1, image_size=SIDE, hidden_dim=128,
        kernel_sizes=[3, 5, 3], in_channels=[32, 16, 24], out_channels=[16, 24, 40],
        strides=[1, 2, 2], num_block_repeats=[1, 1, 1], expand_ratios=[1, 6, 6],
        depthwise_padding=[1], num_labels=3)
    return transformers.EfficientNetForImageClassification(config)


def _convnext() -> nn.Module:
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                         layer_scale_init_value=0.5, num_labels=3)
    return transformers.ConvNextForImageClassification(config)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet": _resnet, "mobilenet_v2": _mobilenet_v2, "efficientnet": _efficientnet,
    "convnext": _convnext,
}


@functools.cache
def build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The wrapped model in eval mode, and its state with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = Logits(MODELS[name]()).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model, copy.deepcopy(model.state_dict())


def model_with(name: str, variant: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """The one model object of `name`, its parameters set in place to `variant`'s."""
    model, state = build(name)
    model.load_state_dict(state)
    if variant is not None:
        model.load_state_dict(variant(copy.deepcopy(model)).state_dict())
    assert not model.training
    return model


_TRACED: dict[tuple[str, int], TracedModel | TraceError] = {}


def _fresh(key: tuple[str, int], trace: Callable[[], TracedModel]) -> TracedModel:
    """A copy of the model's one trace (building a program rewrites its graph)."""
    if key not in _TRACED:
        try:
            _TRACED[key] = trace()
        except TraceError as exc:
            _TRACED[key] = exc
    traced = _TRACED[key]
    if isinstance(traced, TraceError):
        raise traced
    graph = copy.deepcopy(traced.graph)
    graph.owning_module = traced.graph.owning_module
    return dataclasses.replace(traced, graph=graph)


@pytest.fixture(autouse=True, scope="module")
def _traced_once() -> Iterator[None]:
    module = sys.modules["relprop.program.cache"]
    fx_trace, export_trace = module.trace_fx, module.trace_export

    def trace_fx(model: nn.Module, *args: Any, **kwargs: Any) -> TracedModel:
        leaves = args[0] if args else kwargs.get("leaves")
        if leaves or len(args) > 1 or kwargs.get("inputs", 1) != 1 or kwargs.get("keywords"):
            return fx_trace(model, *args, **kwargs)
        return _fresh(("fx", id(model)), lambda: fx_trace(model, *args, **kwargs))

    def trace_export(model: nn.Module, *args: Any, **kwargs: Any) -> TracedModel:
        return _fresh(("export", id(model)), lambda: export_trace(model, *args, **kwargs))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "trace_fx", trace_fx)
        mp.setattr(module, "trace_export", trace_export)
        yield


@pytest.mark.parametrize("name", list(MODELS))
def test_bias_free_epsilon_conserves(name: str) -> None:
    x = 10 * torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    assert_bias_free_epsilon_conserves(model_with(name, bias_free), x)


@pytest.mark.parametrize("name", list(MODELS))
def test_ledger_accounts_for_biases(name: str) -> None:
    model = model_with(name, with_random_biases)
    x = torch.randn(1, 3, SIDE, SIDE, dtype=torch.float64)
    expl = relprop.explain(model, x, composite="epsilon", record=True)
    assert_ledger_accounts_for_biases(expl)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_composite_runs(name: str) -> None:
    x = torch.randn(1, 3, SIDE, SIDE, dtype=torch.float64)
    assert_every_composite_runs(model_with(name), x)


# what stopped each model before: in-place add (ResNet's `hidden_state += residual`),
# TF-style padding and in-place dropout (MobileNetV2), nn.ZeroPad2d (EfficientNet)
STOPPED_AT = {"resnet": {"aten.add_"}, "mobilenet_v2": {"aten.pad", "aten.dropout_"},
              "efficientnet": {"ZeroPad2d"}}


@pytest.mark.parametrize("name", list(STOPPED_AT))
def test_the_ops_that_stopped_them_are_explained(name: str) -> None:
    explainer = relprop.Explainer(model_with(name), "epsilon")
    explainer.explain(torch.randn(1, 3, SIDE, SIDE, dtype=torch.float64))
    labels = {s.node.meta.get("relprop_label") for s in explainer.program.steps}
    assert STOPPED_AT[name] <= labels
