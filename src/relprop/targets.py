"""Targets: which outputs an explanation starts from, and with how much relevance.

Pure functions of the target the user gave and the model's output, kept apart from
the Explainer so that every target form can be tested without a model:

- `logits`: the tensor to explain (the output, or the `logits` of an output object,
  CLIP's `logits_per_text` for its text, `logits_per_image` for its pixels);
- `at_position`: class targets of a sequence output (B, T, V) at one position;
- `resolve`: any target form as (B, K) indices into the flattened output;
- `seeds`: the starting gradient c at the output for each target (relevance = c * output);
- `chunk`: the targets of a slice of the batch;
- `seeding`: all of the above in order, from a model's output to the seeds and the
  explained values (what every backward pass of relprop starts from); a `Contrast`
  target (relprop.contrast) seeds the difference of two targets' seeds.

Captum's convention: an int (or a tuple indexing a multi-dimensional output) for every
sample; a list, or a 1-d tensor, of B entries: one per sample; a (B, K) or (1, K)
tensor or nested list: K per sample, sharing one forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RelpropError, TargetError
from .rules import stabilize


@dataclass(frozen=True)
class Contrast:
    """Output a minus output b ("why a and not b"): a, b any target form, K alike."""

    a: Any
    b: Any


Target = (int | tuple[int, ...] | Sequence[int] | Sequence[Sequence[int]] | Tensor | Contrast
          | None)
STARTS = ("value", "one", "softmax")


# the fields of an output object explained, first found first: a classifier's or language
# model's logits; a contrastive image-text model's similarities (CLIP, SigLIP; see
# `logits`); a projection tower's embeddings
FIELDS = ("logits", "logits_per_text", "logits_per_image", "text_embeds", "image_embeds")


def logits(output: Any, explained: Tensor | None = None) -> Tensor:
    """The tensor to explain: the output itself, or the first of FIELDS an output object
    holds (Hugging Face's ModelOutput, a dict: the same fields whichever tracer made the
    program, relprop.passes.outputs).

    A contrastive model's similarities are explained with one row per sample of the
    explained input, so that each sample's relevance is its own: `logits_per_text`
    (B_text, B_image) for token ids (a CLIPModel called with its first argument,
    `input_ids`, and by default), `logits_per_image` (B_image, B_text) for pixels."""
    if isinstance(output, Tensor):
        return output
    get = output.get if isinstance(output, dict) else lambda k: getattr(output, k, None)
    if explained is not None and explained.is_floating_point() and \
            isinstance(get("logits_per_image"), Tensor):
        return get("logits_per_image")
    for name in FIELDS:
        found = get(name)
        if isinstance(found, Tensor):
            return found
    raise RelpropError(f"the model returned {type(output).__name__}, not a tensor (nor an "
                       f"object with a tensor among {', '.join(FIELDS)}); wrap it so that it "
                       "returns the tensor to explain")


def flat(output: Tensor, batch: int) -> Tensor:
    """The output as (B, N), after checking that it is batch-first."""
    if output.dim() == 0 or output.shape[0] != batch:
        raise RelpropError(f"the output has shape {tuple(output.shape)}; expected the batch "
                           f"size {batch} first")
    return output.reshape(batch, -1)


def generates(model: nn.Module) -> bool:
    """A Hugging Face model that generates text (its (B, T, V) logits predict the next
    token at every position)."""
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:
        return False


def default_position(model: nn.Module, output: Tensor, position: int | None) -> int | None:
    """The position class targets index: the one given, else the last for a causal LM's
    (B, T, V) logits (the next token), else none."""
    if position is None and output.dim() == 3 and generates(model):
        return -1
    return position


def at_position(target: Target, output: Tensor, position: int) -> Target:
    """Class targets of a sequence output (B, T, V) as (position, class) tuples."""
    if output.dim() != 3:
        raise TargetError(f"position={position}: the output has shape "
                          f"{tuple(output.shape)}, not a sequence of logits (B, T, V)")
    T = output.shape[1]
    if not -T <= position < T:
        raise TargetError(f"position={position} is out of range for a sequence of {T}")

    def at(t: Any) -> Any:
        if isinstance(t, list):
            return [at(e) for e in t]
        if isinstance(t, int) and not isinstance(t, bool):
            return (position, t)
        return t  # a (position, class) tuple keeps its own position

    if target is None:
        return output.detach()[:, position].argmax(-1).tolist()
    if isinstance(target, Tensor):
        target = target.tolist()
    if isinstance(target, int) and not isinstance(target, bool):
        return (position, target)
    return at(target) if isinstance(target, list) else target


def resolve(target: Target, output: Tensor,
            output_relevance: Tensor | None = None) -> tuple[Tensor, bool]:
    """(B, K) indices into the flattened output, and whether K maps per sample were asked
    (a nested list or a 2-d tensor; the others give K = 1). With `output_relevance`,
    (B, 1) of -1: the seed is that relevance, no index."""
    batch = output.shape[0]
    inner = tuple(output.shape[1:])
    n = math.prod(inner)
    device = output.device
    if output_relevance is not None:
        if target is not None:
            raise TargetError("give either target= or output_relevance=, not both")
        return torch.full((batch, 1), -1, dtype=torch.long, device=device), False
    if target is None:
        return output.detach().reshape(batch, -1).argmax(1, keepdim=True), False
    if isinstance(target, bool) or (isinstance(target, Tensor) and (
            target.is_floating_point() or target.dtype == torch.bool)):
        kind = f"a tensor of dtype {target.dtype}" if isinstance(target, Tensor) else "a bool"
        raise TargetError(f"target is {kind}; give class indices (an int, a list of ints, "
                          "a torch.long tensor)")
    if isinstance(target, tuple):  # one position in a multi-dimensional output, all samples
        index = torch.full((batch, 1), flat_position(target, inner), dtype=torch.long,
                           device=device)
        return index, False
    if isinstance(target, int):
        index = torch.full((batch, 1), target, dtype=torch.long, device=device)
        multi = False
    elif isinstance(target, list):
        if not target:
            raise TargetError("target=[] is empty: give one target per sample")
        if all(isinstance(t, list) for t in target):  # nested: K per sample
            t = _as_index(target, device, inner)
            multi = True
        else:
            t = torch.tensor([flat_position(v, inner) if isinstance(v, tuple) else v
                              for v in target], dtype=torch.long, device=device)
            multi = False
        index = _per_sample(t, batch, multi, target)
    elif isinstance(target, Tensor):
        t = target.to(device=device, dtype=torch.long)
        if t.dim() > 2:
            raise TargetError(f"target has shape {tuple(target.shape)}; expected (), (B,), "
                              "(B, K) or (1, K)")
        multi = t.dim() == 2
        index = t.expand(batch)[:, None] if t.dim() == 0 else _per_sample(t, batch, multi,
                                                                           target)
    else:
        raise TargetError(f"target={target!r}: give None (the predicted class), an int, a "
                          "list or 1-d tensor of one index per sample, or a (B, K) tensor")
    bad = (index < 0) | (index >= n)
    if bad.any():
        v = index[bad][0].item()
        raise TargetError(f"target {v} is out of range: the model has {n} outputs "
                          f"(valid targets 0..{n - 1})")
    return index, multi


def flat_position(position: Any, inner: tuple[int, ...]) -> int:
    """A tuple index into one sample's output, as an index into its flattened output."""
    if isinstance(position, int) and not isinstance(position, bool):
        return position
    if not isinstance(position, tuple) or len(position) != len(inner) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in position):
        raise TargetError(f"target {position!r}: a tuple indexes one output position and "
                          f"needs {len(inner)} ints for an output of shape (B, "
                          f"{', '.join(map(str, inner))})")
    index = 0
    for p, size in zip(position, inner, strict=True):
        if not -size <= p < size:
            raise TargetError(f"target {position!r} is out of range for an output of shape "
                              f"(B, {', '.join(map(str, inner))})")
        index = index * size + p % size
    return index


def seeds(flat: Tensor, index: Tensor, start: str,
          output_relevance: Tensor | None = None,
          shape: tuple[int, ...] | None = None) -> Tensor:
    """c at the output for each target: (K, B, N). Relevance there is c * output.

    start="value": c = 1 at the target (relevance = the logit); "one": relevance 1;
    "softmax": relevance = the target's probability, over the class axis of the output's
    `shape` (the flattened rows' own if None): (B, C)'s classes, a sequence (B, T, V)'s
    vocabulary at the target's position. `output_relevance` (B, ...) the output's shape:
    that relevance itself (K = 1)."""
    check_start(start)
    out = flat.detach()
    batch = out.shape[0]
    if output_relevance is not None:
        r = output_relevance.to(out).reshape(batch, -1) if output_relevance.numel() == \
            out.numel() else None
        if r is None:
            raise TargetError(f"output_relevance has shape {tuple(output_relevance.shape)}; "
                              f"expected the output's shape {tuple(out.shape)}")
        if ((out == 0) & (r != 0)).any():
            raise TargetError("output_relevance puts relevance on an output whose value is 0; "
                              "relevance cannot start there in gradient form")
        return (r / torch.where(out == 0, 1.0, out))[None]
    one_hot = torch.zeros((index.shape[1], *out.shape), dtype=out.dtype, device=out.device)
    one_hot.scatter_(2, index.T[:, :, None], 1.0)
    if start == "value":
        return one_hot
    scale = 1.0 / stabilize(out, 1e-12)
    if start == "softmax":
        scale = scale * probabilities(out, shape)
    return one_hot * scale


def probabilities(rows: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    """The softmax over the class axis, as flattened rows (B, N): the last axis of a
    (B, C) or (B, T, V) output; other shapes have no one class axis and are refused."""
    if shape is None or len(shape) == 2:
        return rows.softmax(1)
    if len(shape) == 3:
        return rows.reshape(shape).softmax(-1).reshape(rows.shape)
    raise TargetError(f"start='softmax' on an output of shape {tuple(shape)}: its class axis "
                      "is ambiguous; give (B, C) class scores or (B, T, V) sequence logits, "
                      "or start='value'")


def check_start(start: str) -> None:
    if start not in STARTS:
        raise RelpropError(f"start={start!r}: choose one of {', '.join(STARTS)}")


def chunk(target: Target, sl: slice, total: int) -> Target:
    """The targets of samples `sl`: per-sample ones (B entries) are split with the batch,
    targets for every sample (an int, a tuple, a (1, K) row) are not."""
    if isinstance(target, Contrast):
        return Contrast(chunk(target.a, sl, total), chunk(target.b, sl, total))
    if isinstance(target, Tensor) and target.dim() == 0:
        return target  # len() of a 0-d tensor raises
    if isinstance(target, Tensor | list) and len(target) == total:
        return target[sl]
    return target


def _as_index(nested: list, device: torch.device, inner: tuple[int, ...] = ()) -> Tensor:
    if inner and any(isinstance(e, tuple) for row in nested for e in row):
        nested = [[flat_position(e, inner) if isinstance(e, tuple) else e for e in row]
                  for row in nested]
    try:
        return torch.tensor(nested, dtype=torch.long, device=device)
    except (TypeError, ValueError) as exc:
        raise TargetError(f"target={nested!r}: a nested list must be rectangular, of ints "
                          "(B rows of K classes, or one row for every sample)") from exc


def _per_sample(t: Tensor, batch: int, multi: bool, given: Any) -> Tensor:
    """(B, K) from B per-sample targets, or from (B, K) / (1, K) several per sample."""
    if not multi:
        if t.shape[0] != batch:
            raise TargetError(
                f"target has {t.shape[0]} entries but the batch has {batch} samples: a list "
                "or 1-d tensor gives one target per sample (Captum's convention); for several "
                f"classes per sample give a (B, K) or (1, K) tensor or nested list, e.g. "
                f"[{list(given)[:3]}] for those classes in every sample")
        return t[:, None]
    if t.shape[0] not in (1, batch):
        raise TargetError(f"target has shape {tuple(t.shape)}; expected ({batch}, K) or (1, K)")
    return t.expand(batch, -1)


@dataclass(frozen=True)
class Seeding:
    """Where a backward pass starts: the explained tensor, as (B, N), the targets' indices
    into it (B, K), whether K maps per sample were asked, the seeds (K, B, N) and the
    relevance put at the output (B, K)."""

    output: Tensor
    flat: Tensor
    index: Tensor
    multi: bool
    seeds: Tensor
    explained: Tensor


def seeding(model: nn.Module, output: Any, batch: int, target: Target,
            output_relevance: Tensor | None = None, start: str = "value",
            position: int | None = None, explained_input: Tensor | None = None) -> Seeding:
    """How a target becomes the start of a backward pass, in one place: the tensor to
    explain (`logits`), the class targets at the generating position of a causal LM
    (`default_position`, `at_position`), their indices (`resolve`) and seeds (`seeds`).
    A Contrast seeds a's seeds minus b's (the index kept is a's)."""
    if isinstance(target, Contrast):
        if output_relevance is not None:
            raise TargetError("give either a contrast target or output_relevance=, not both")
        a, b = (seeding(model, output, batch, t, None, start, position, explained_input)
                for t in (target.a, target.b))
        if a.seeds.shape != b.seeds.shape:
            raise TargetError(f"contrast: {a.seeds.shape[0]} targets against "
                              f"{b.seeds.shape[0]}; give as many of each")
        diff = a.seeds - b.seeds
        return Seeding(a.output, a.flat, a.index, a.multi, diff,
                       (diff * a.flat.detach()).sum(-1).T)
    out = logits(output, explained_input)
    rows = flat(out, batch)
    position = default_position(model, out, position)
    if position is not None and output_relevance is None:
        target = at_position(target, out, position)
    index, multi = resolve(target, out, output_relevance)
    start_grads = seeds(rows, index, start, output_relevance, tuple(out.shape))  # (K, B, N)
    explained = (start_grads * rows.detach()).sum(-1).T  # (B, K)
    if not torch.isfinite(explained).all():
        b, k = (~torch.isfinite(explained)).nonzero()[0].tolist()
        raise TargetError(f"the model's output to explain is {float(explained[b, k])} "
                          f"(sample {b}, target {k}): relevance of a NaN or Inf means nothing; "
                          "the model computes it so without relprop (call it directly to see)")
    return Seeding(out, rows, index, multi, start_grads, explained)
