"""Models and images for the command line, loaded the way people already load them, with
errors that say what is wrong.

Models: a torchvision name (`--weights DEFAULT` / `IMAGENET1K_V2` picks its weight enum,
from torch's cache or downloaded), `timm:NAME` (timm.create_model), `hf:NAME_OR_PATH` (a
Hugging Face image classifier, local files only) or `package.module:callable`. Named
weights come with their preprocessing and class names; `--weights FILE` loads a state_dict
(or a checkpoint holding one under "state_dict" / "model") into any of them.

Images: files or folders, turned into pixels in [0, 1] (resized, cropped), then normalised.
The two steps stay apart so that overlays show the pixels the model saw and z-box bounds
follow from the normalisation. Reading image files is the library's (relprop.dataset.images,
which explain_dataset's ImageFiles uses too); this module adds what weights declare.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from ..dataset.images import IMAGENET_MEAN, IMAGENET_STD, normalized_batch, open_image, resize_crop
from ..errors import RelpropError
from ..visualize import optional

_FILE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar", ".pkl"}


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes the model's input: `pixels` (a PIL image to (H, W, C) floats
    in [0, 1], resized and cropped), then (pixels - mean) / std per channel (none if mean
    is None). `source` says who declared it, for messages."""

    pixels: Callable[[Any], np.ndarray]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""

    def read(self, path: Path) -> np.ndarray:
        return np.asarray(self.pixels(open_image(path)), dtype=np.float32)

    def batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
        """(B, C, H, W) model input and the z-box bounds (the normalised 0 and 1)."""
        return normalized_batch(images, self.mean, self.std)


@dataclass
class LoadedModel:
    """A model in eval mode, with the preprocessing and class names its weights declare
    (None where they declare none: then --size / --no-normalize decide)."""

    model: nn.Module
    preprocessing: Preprocessing | None = None
    categories: list[str] | None = None


def load_model(arch: str, weights: str | Path | None = None) -> nn.Module:
    """The model alone (see `load`)."""
    return load(arch, weights).model


def load(arch: str, weights: str | Path | None = None) -> LoadedModel:
    """A model by name (module docstring), in eval mode, with what its weights declare."""
    if arch.startswith("timm:"):
        return _timm(arch[5:], weights)
    if arch.startswith("hf:"):
        return _hf(arch[3:], weights)
    if ":" in arch:
        model = _from_callable(arch)
        if weights is not None:
            _load_file(model, weights, arch)
        return LoadedModel(model.eval())
    return _torchvision(arch, weights)


def plain_preprocessing(size: int | None = 224, normalize: bool = True) -> Preprocessing:
    """Shorter side to `size`, centre crop, ImageNet statistics: for weights that declare
    nothing (a state_dict file, a `module:callable`)."""
    return Preprocessing(partial(resize_crop, size=size),
                         IMAGENET_MEAN if normalize else None,
                         IMAGENET_STD if normalize else None, "--size / --no-normalize")


# --- model sources -----------------------------------------------------------------------

def _from_callable(arch: str) -> nn.Module:
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RelpropError(f"cannot load model {arch!r}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise RelpropError(f"{arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _torchvision(arch: str, weights: str | Path | None) -> LoadedModel:
    tv = optional("torchvision", "pip install torchvision")
    if arch not in tv.models.list_models(module=tv.models):
        raise RelpropError(f"unknown architecture {arch!r}: not a torchvision classification "
                           "model name, 'timm:NAME', 'hf:NAME' or 'module:callable'")
    name = _weights_name(weights)
    if name is None:
        model = tv.models.get_model(arch, weights=None)
        if weights is not None:
            _load_file(model, weights, arch)
        return LoadedModel(model.eval())
    enum = tv.models.get_model_weights(arch)
    try:
        chosen = tv.models.get_weight(name) if "." in name else enum[name]
        if not isinstance(chosen, enum):
            raise KeyError(name)
    except (KeyError, ValueError) as exc:
        raise RelpropError(f"no file and no weights named {name!r} for {arch}: choose one of "
                           f"{', '.join(enum.__members__)}") from exc
    model = _from_hub_cache(lambda: tv.models.get_model(arch, weights=chosen), chosen.url,
                            f"the weights {chosen}")
    return LoadedModel(model.eval(), _declared(chosen.transforms(), str(chosen)),
                       list(chosen.meta["categories"]))


def _timm(name: str, weights: str | Path | None) -> LoadedModel:
    """timm:NAME[.TAG]: pretrained when the name has a tag or --weights is DEFAULT / a tag,
    from the local cache first; random weights otherwise (like a torchvision name)."""
    timm = optional("timm", "pip install timm")
    tag = _weights_name(weights)
    full = name if tag in (None, "DEFAULT") else f"{name}.{tag}"
    if not timm.is_model(full.split(".")[0]):
        raise RelpropError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    try:
        model = timm.create_model(full)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise RelpropError(f"timm cannot build {full!r}: {exc}") from exc
    if tag is not None or "." in name:
        model = _timm_pretrained(timm, full, model.pretrained_cfg)
    elif weights is not None:
        _load_file(model, weights, name)
    config = timm.data.resolve_data_config({}, model=model)
    return LoadedModel(model.eval(), _declared(timm.data.create_transform(**config),
                                               f"timm {full}"), _timm_categories(model))


def _timm_pretrained(timm: Any, full: str, cfg: dict[str, Any]) -> nn.Module:
    cached = _timm_cached_file(cfg)
    if cached is not None:
        return timm.create_model(full, pretrained=True, pretrained_cfg_overlay={
            "file": str(cached)})
    try:
        return timm.create_model(full, pretrained=True)
    except Exception as exc:
        if cfg.get("hf_hub_id"):
            hub = optional("huggingface_hub.constants", "pip install huggingface_hub")
            where = (f"fetch them once where there is network (`hf download "
                     f"{cfg['hf_hub_id']}`) into {hub.HF_HUB_CACHE}")
        else:
            where = f"put the file at {_hub_checkpoint(cfg.get('url') or '')}"
        raise RelpropError(f"timm weights {full} are not in the local cache and could not "
                           f"be downloaded ({_first_line(exc)}): {where}, or give "
                           "--weights FILE") from exc


def _timm_cached_file(cfg: dict[str, Any]) -> Path | None:
    """The weights file of a timm pretrained config in the Hugging Face or torch cache."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        hf = optional("huggingface_hub", "pip install huggingface_hub")
        repo, _, revision = hub_id.partition("@")
        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            found = filename and hf.try_to_load_from_cache(repo, filename,
                                                           revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url")
    if url and _hub_checkpoint(url).is_file():
        return _hub_checkpoint(url)
    return None


def _timm_categories(model: nn.Module) -> list[str] | None:
    """ImageNet class names (the first of each description, like torchvision's) when timm
    knows the model's label set."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        return [d.split(",")[0] for d in ImageNetInfo(subset).label_descriptions()]
    except (ImportError, AssertionError, KeyError, OSError):
        return None


class Logits(nn.Module):
    """A Hugging Face classifier whose forward returns its logits: relprop explains a
    tensor, and HF models return an output object."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _hf(name: str, weights: str | Path | None) -> LoadedModel:
    """hf:NAME_OR_PATH: AutoModelForImageClassification + AutoImageProcessor, local files
    only (a folder written by save_pretrained, or the Hugging Face cache)."""
    transformers = optional("transformers", "pip install transformers")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(
            name, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(name,
                                                                    local_files_only=True)
    except (OSError, ValueError) as exc:
        hub = optional("huggingface_hub.constants", "pip install huggingface_hub")
        raise RelpropError(f"cannot load the Hugging Face image classifier {name!r} from "
                           f"local files ({_first_line(exc)}): give a folder written by "
                           f"save_pretrained, or fetch it once where there is network "
                           f"(`hf download {name}`) into {hub.HF_HUB_CACHE}") from exc
    tag = _weights_name(weights)
    if tag not in (None, "DEFAULT"):
        raise RelpropError(f"--weights {tag!r}: an hf: model brings its weights; give a file "
                           "or nothing")
    if weights is not None and tag is None:
        _load_file(model, weights, name)
    labels = model.config.id2label
    categories = [str(labels.get(i, i)) for i in range(model.config.num_labels)]
    return LoadedModel(Logits(model).eval(), _hf_preprocessing(processor, name), categories)


@dataclass(frozen=True)
class _ProcessorPixels:
    """A Hugging Face image processor without its normalisation (a class, not a closure,
    so that DataLoader workers can pickle it)."""

    processor: Any

    def __call__(self, image: Any) -> np.ndarray:
        out = self.processor(images=image, return_tensors="pt", do_normalize=False)
        return out["pixel_values"][0].permute(1, 2, 0).numpy()


def _hf_preprocessing(processor: Any, name: str) -> Preprocessing:
    """The processor's resize/crop/rescale as pixels, its normalisation as mean/std."""
    pixels = _ProcessorPixels(processor)
    if not getattr(processor, "do_normalize", False):
        return Preprocessing(pixels, source=f"the image processor of {name}")
    return Preprocessing(pixels, _floats(processor.image_mean), _floats(processor.image_std),
                         f"the image processor of {name}")


# --- weights -------------------------------------------------------------------------------

def _weights_name(weights: str | Path | None) -> str | None:
    """'DEFAULT', 'IMAGENET1K_V2', 'ResNet50_Weights.IMAGENET1K_V2' or a timm tag: a name,
    not a file (None for a file or for no weights)."""
    if weights is None or Path(weights).is_file():
        return None
    text = str(weights)
    if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)?", text) and \
            Path(text).suffix.lower() not in _FILE_SUFFIXES:
        return text
    return None


def _load_file(model: nn.Module, weights: str | Path, name: str) -> None:
    """A state_dict, or a checkpoint holding one under "state_dict" or "model"."""
    path = Path(weights)
    if not path.is_file():
        raise RelpropError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RelpropError(f"cannot read weights {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0:3]
        raise RelpropError(f"weights {path} do not fit {name}: {' '.join(first)}") from exc


def _hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps (and looks for) the file of this URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _from_hub_cache(build: Callable[[], nn.Module], url: str, what: str) -> nn.Module:
    """build() reads torch's cache (offline) or downloads; a failed download says where
    the file belongs."""
    path = _hub_checkpoint(url)
    cached = path.is_file()
    try:
        return build()
    except Exception as exc:
        if cached:
            raise RelpropError(f"cannot read {what} from {path}: {_first_line(exc)}") from exc
        raise RelpropError(f"{what} are not in torch's cache and could not be downloaded "
                           f"({_first_line(exc)}): download {url} and put it at {path}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- images ----------------------------------------------------------------------------------

def _declared(transform: Any, source: str) -> Preprocessing:
    """A torchvision-style transform ending in normalisation (torchvision's
    ImageClassification, a Compose ending in Normalize): run as declared up to that step,
    whose mean/std become the Preprocessing's (x - mean) / std (the same float ops)."""
    steps = list(getattr(transform, "transforms", [transform]))
    norm = steps[-1]
    if not (hasattr(norm, "mean") and hasattr(norm, "std")):
        raise RelpropError(f"the preprocessing of {source} does not end in normalisation: "
                           f"{transform}")
    mean, std = _floats(norm.mean), _floats(norm.std)
    identity = copy.copy(norm)
    identity.mean, identity.std = [0.0] * len(mean), [1.0] * len(std)
    steps[-1] = identity
    return Preprocessing(_TransformPixels(tuple(steps)), mean, std, source)


@dataclass(frozen=True)
class _TransformPixels:
    """Transform steps applied in turn, ending in a (C, H, W) tensor; as (H, W, C) array."""

    steps: tuple[Any, ...]

    def __call__(self, image: Any) -> np.ndarray:
        for step in self.steps:
            image = step(image)
        return image.permute(1, 2, 0).numpy()


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))
