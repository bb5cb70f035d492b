"""Faithfulness checks for explanations: region perturbation, AOPC/ABPC, model randomisation.

A heatmap can look plausible and still not reflect what the model uses. Region perturbation
(Samek et al. 2017) asks whether removing what an explanation ranks highest hurts the model's
output most; cascading model randomisation (Adebayo et al. 2018) asks whether the explanation
changes at all when the model does. `baselines` gives the trivial explanations to beat.

Everything here is batched, runs the model with inference semantics (eval mode, restored
afterwards) and never modifies the model or the input.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .composites import Composite
from .errors import InputError, TargetError
from .trace import preserved

ORDERS = ("morf", "lerf")
ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def region_perturbation(model: nn.Module, x: Tensor, relevance: Tensor, target: int | Tensor,
                        patch_size: int = 9, steps: int = 100, order: str = "morf",
                        fill: str | float = "uniform", seed: int = 0,
                        batch_size: int | None = None) -> Tensor:
    """The model's output at `target` while the image loses one region at a time.

    Returns (B, steps + 1): column k is f(x_k), x_0 = x unperturbed. Regions are the cells of
    a patch_size x patch_size grid anchored at the top-left pixel (partial cells at the
    bottom/right borders are regions too), all channels together; a region's score is its
    summed relevance. order "morf" removes the highest score first, "lerf" the lowest; ties
    go to the lower region index (raster order, stable sort). `steps` larger than the number
    of regions is clamped to it, so the curve then has n_regions + 1 columns.

    fill "uniform": each replaced value is uniform in [min, max) of that sample's x (over all
    channels and pixels). The noise pattern is drawn once per call from a torch.Generator
    seeded with `seed` and scaled per sample, so a sample's curve does not depend on the batch
    it came in; a number: that constant. batch_size: images per forward pass, rounded down to
    whole steps of B images (None: one pass per step).
    """
    x = _check_image(x)
    scores = _region_scores(relevance, x.shape, patch_size)
    ranking = _rank(scores, order)[:, :_check_steps(steps)]
    regions = _region_map(x.shape[-2], x.shape[-1], patch_size, x.device)
    filler = _fill_values(x, fill, seed)
    target = _as_target(target, x.shape[0], x.device)
    per_pass = _steps_per_pass(batch_size, x.shape[0])
    with torch.no_grad(), preserved(model, eval_mode=True):
        path = _perturbation_path(x, ranking, regions, filler)
        return _outputs_along(model, path, target, per_pass)


def aopc(curve: Tensor) -> Tensor:
    """(B,) area over the perturbation curve: mean over k = 0..L of f(x_0) - f(x_k).

    Samek et al. 2017 normalise by L + 1 (the k = 0 term, always 0, counts), so the values
    are comparable with theirs. Higher for MoRF means the explanation found what matters.
    """
    _check_curve(curve)
    return (curve[:, :1] - curve).mean(1)


def abpc(morf_curve: Tensor, lerf_curve: Tensor) -> Tensor:
    """(B,) area between the LeRF and MoRF curves: mean over k of f_lerf(x_k) - f_morf(x_k).

    Unlike AOPC it rewards an explanation for both ends of its ranking, and a model whose
    output drops whatever is removed no longer scores well by default.
    """
    _check_curve(morf_curve)
    _check_curve(lerf_curve)
    if morf_curve.shape != lerf_curve.shape:
        raise InputError(f"curves differ in shape: {tuple(morf_curve.shape)} (morf) vs "
                         f"{tuple(lerf_curve.shape)} (lerf)")
    return (lerf_curve - morf_curve).mean(1)


def token_deletion(model_fn: Callable[[Tensor, Tensor], Tensor], ids: Tensor,
                   relevance: Tensor, *, attention_mask: Tensor | None = None,
                   deletable: Tensor | None = None, replace_id: int | None = None,
                   steps: int = 10, order: str = "morf",
                   batch_size: int | None = None) -> Tensor:
    """The score of a text model while its tokens are deleted, most relevant first.

    model_fn(ids, attention_mask) -> (B,) scores (a logit, a similarity); ids (B, T) token
    ids; relevance (B, T) per token (or (B, T, D), summed over D); attention_mask (B, T)
    (default all ones); deletable (B, T) bool, the tokens that may go (default: those the
    mask keeps; leave out [CLS]/[SEP]-like tokens here). A deleted token is replaced by
    `replace_id` ([MASK] or the pad id), or with replace_id None removed: its attention
    mask entry set to 0, so attention and masked pooling no longer see it (positions of
    the others unchanged).

    Returns (B, steps + 1): column k is the score with the first ceil(k * n_i / steps) of
    sample i's n_i deletable tokens deleted, in the order of the ranking ("morf": highest
    relevance first, "lerf": lowest; ties go to the earlier token), so column 0 is the
    untouched input, the last column has every deletable token gone, and sentences of
    different lengths share one curve length. aopc(curve) is the area over it. batch_size:
    sequences per model_fn call, rounded down to whole steps of B (None: one call per step).
    """
    if ids.dim() != 2 or ids.is_floating_point():
        raise InputError(f"ids must be (B, T) integer token ids, got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    r = relevance.detach()
    r = r.sum(-1) if r.dim() == 3 else r
    if r.shape != ids.shape:
        raise InputError(f"relevance has shape {tuple(relevance.shape)}; expected "
                         f"{tuple(ids.shape)} (or with an embedding axis)")
    if not torch.isfinite(r).all():
        raise InputError("relevance contains NaN or Inf; tokens cannot be ranked")
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}; expected "
                         f"{tuple(ids.shape)}")
    allowed = mask.bool() if deletable is None else deletable.to(ids.device).bool() & \
        mask.bool()
    steps = _check_steps(steps)
    # the ranking: non-deletable tokens last, whatever their relevance
    fence = torch.tensor(float("-inf") if order == "morf" else float("inf"), dtype=r.dtype,
                         device=r.device)
    ranking = _rank(torch.where(allowed, r, fence), order)
    rank = torch.empty_like(ranking)
    rank.scatter_(1, ranking, torch.arange(ids.shape[1], device=ids.device).expand_as(ranking))
    n = allowed.sum(1, keepdim=True)
    path = []
    for k in range(steps + 1):
        gone = allowed & (rank < torch.div(k * n + steps - 1, steps, rounding_mode="floor"))
        if replace_id is None:
            path.append((ids, mask.masked_fill(gone, 0)))
        else:
            path.append((ids.masked_fill(gone, replace_id), mask))
    scores = []
    with torch.no_grad():
        for chunk in _chunks(path, _steps_per_pass(batch_size, ids.shape[0])):
            out = model_fn(torch.cat([c[0] for c in chunk]), torch.cat([c[1] for c in chunk]))
            scores.extend(out.detach().reshape(len(chunk), ids.shape[0]).unbind(0))
    return torch.stack(scores, 1)


def randomization_check(model: nn.Module, x: Tensor, explain_fn: ExplainFn,
                        target: int | Tensor, seed: int = 0) -> dict[str, list[str] | Tensor]:
    """Cascading model randomisation (Adebayo et al. 2018), from the output layer down.

    An explanation that barely changes when the model's weights are destroyed explains the
    input, not the model. On a deep copy (the user's model is never touched), the layers with
    weights (nn.Linear, nn.Conv*) are re-initialised in reverse order of execution, one more
    at each step, with PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) drawn from a
    torch.Generator seeded with `seed` (the global RNG is not used).

    explain_fn(model, x, target) returns a relevance tensor like x (an object with
    `.relevance`, e.g. relprop.explain's result, works too). Returns:
    "layers": module names in the order they were randomised; "spearman": (n_layers, B), row
    k-1 the Spearman rank correlation of |relevance| (flattened per sample) between the
    original model and the model with its top k layers randomised; "spearman_before": (B,),
    the same between two explanations of the unchanged model (1 for a deterministic
    explain_fn; the ceiling the rows are measured against).
    """
    x = _check_image(x, images_only=False)
    twin = copy.deepcopy(model)
    layers = _layers_from_output(twin, x)
    generator = torch.Generator().manual_seed(seed)
    original = _explain(explain_fn, twin, x, target).abs()
    before = spearman(original, _explain(explain_fn, twin, x, target).abs())
    rows = []
    for name in layers:
        _reinitialise(twin.get_submodule(name), generator)
        rows.append(spearman(original, _explain(explain_fn, twin, x, target).abs()))
    table = torch.stack(rows) if rows else before.new_empty(0, x.shape[0])
    return {"layers": layers, "spearman": table, "spearman_before": before}


def baselines(model: nn.Module, x: Tensor, target: int | Tensor,
              seed: int = 0) -> dict[str, Tensor]:
    """Trivial explanations any method should beat: input gradient, gradient x input, noise.

    "random" is uniform in [0, 1), drawn from a torch.Generator seeded with `seed`. The model
    runs in eval mode (restored afterwards); parameter .grad is not touched.
    """
    x = _check_image(x, images_only=False)
    grad = input_gradient(model, x, target)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return {"gradient": grad, "gradient_x_input": grad * x.detach(), "random": noise}


def input_gradient(model: nn.Module, x: Tensor, target: int | Tensor) -> Tensor:
    """d f_target(x) / dx per sample, without accumulating into the parameters' .grad."""
    target = _as_target(target, x.shape[0], x.device)
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), preserved(model, eval_mode=True):
        picked = _pick(model(leaf), target).sum()
        (grad,) = torch.autograd.grad(picked, leaf)
    return grad


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """(B,) Spearman rank correlation of a and b, flattened per sample.

    Pearson correlation of ranks; tied values share their average rank. NaN where a or b is
    constant within a sample (no ranking to compare).
    """
    if a.shape != b.shape:
        raise InputError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = _average_ranks(a.flatten(1)), _average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.square().sum(1) * rb.square().sum(1)).sqrt()


def quantus_explain_func(model: nn.Module, inputs: Any, targets: Any, *,
                         composite: str | Composite | None = None, device: Any = None,
                         **kwargs: Any) -> np.ndarray:
    """relprop as a Quantus `explain_func`, so every Quantus metric scores LRP: numpy in,
    numpy out.

    Quantus calls explain_func(model=, inputs=, targets=, **explain_func_kwargs): the
    composite, its parameters (low=, high=, epsilon=, ...) and explain()'s options
    (start=, batch_size=) go in explain_func_kwargs. inputs: a (B, ...) array; targets:
    (B,) class indices or one int. The inputs go to the model's device and dtype (Quantus'
    `device` is used only for a model without parameters). Returns float32 relevance shaped
    like inputs. The Explainer is built on every call because Quantus' randomisation
    metrics change the weights between calls.
    """
    from .explain import DEFAULT_COMPOSITE, explain

    param = next(model.parameters(), None)
    on = param.device if param is not None else torch.device(device or "cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.as_tensor(np.asarray(inputs), dtype=dtype, device=on)
    target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=on).reshape(-1)
    if target.numel() == 1:
        target = target.expand(x.shape[0])
    expl = explain(model, x, target, composite=composite or DEFAULT_COMPOSITE, **kwargs)
    return expl.relevance.detach().float().cpu().numpy()


# --- region perturbation internals ---------------------------------------------------------

def _region_scores(relevance: Tensor, shape: torch.Size, patch_size: int) -> Tensor:
    """(B, n_regions) summed relevance per grid cell, in raster order."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise InputError(f"patch_size must be a positive int, got {patch_size!r}")
    batch, channels, height, width = shape
    r = relevance.detach()
    if r.shape in ((batch, channels, height, width), (batch, 1, height, width)):
        r = r.sum(1)
    if r.shape != (batch, height, width):
        raise InputError(f"relevance has shape {tuple(relevance.shape)}; expected "
                         f"{tuple(shape)} or {(batch, height, width)}")
    if not torch.isfinite(r).all():
        raise InputError("relevance contains NaN or Inf; regions cannot be ranked")
    p = patch_size
    r = F.pad(r, (0, -width % p, 0, -height % p))
    rows, cols = r.shape[1] // p, r.shape[2] // p
    return r.reshape(batch, rows, p, cols, p).sum((2, 4)).reshape(batch, rows * cols)


def _rank(scores: Tensor, order: str) -> Tensor:
    """(B, n_regions) region indices in removal order; stable, so ties keep raster order."""
    if order not in ORDERS:
        raise InputError(f"order={order!r}: give one of {ORDERS}")
    return torch.sort(scores, dim=1, descending=order == "morf", stable=True).indices


def _region_map(height: int, width: int, patch_size: int, device: torch.device) -> Tensor:
    """(H, W) index of the grid cell each pixel belongs to (raster order)."""
    cols = -(-width // patch_size)
    rows_idx = torch.arange(height, device=device) // patch_size
    cols_idx = torch.arange(width, device=device) // patch_size
    return rows_idx[:, None] * cols + cols_idx[None, :]


def _fill_values(x: Tensor, fill: str | float, seed: int) -> Tensor:
    """What each pixel becomes once its region is removed (every pixel goes at most once)."""
    if isinstance(fill, str):
        if fill != "uniform":
            raise InputError(f"fill={fill!r}: give 'uniform' or a number")
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(x.shape[1:], generator=generator).to(device=x.device, dtype=x.dtype)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        return low + (high - low) * noise
    if isinstance(fill, bool) or not isinstance(fill, int | float):
        raise InputError(f"fill={fill!r}: give 'uniform' or a number")
    return torch.full_like(x, float(fill))


def _perturbation_path(x: Tensor, ranking: Tensor, regions: Tensor,
                       filler: Tensor) -> Iterator[Tensor]:
    """x_0 = x, then x_k = x_{k-1} with each sample's k-th region replaced."""
    current = x
    yield current
    for k in range(ranking.shape[1]):
        mask = regions[None] == ranking[:, k, None, None]
        current = torch.where(mask[:, None], filler, current)
        yield current


def _outputs_along(model: nn.Module, path: Iterable[Tensor], target: Tensor,
                   per_pass: int) -> Tensor:
    """(B, n_images): f_target of each image on the path, `per_pass` steps per forward."""
    columns = []
    for chunk in _chunks(path, per_pass):
        picked = _pick(model(torch.cat(chunk)), target.repeat(len(chunk)))
        columns.append(picked.reshape(len(chunk), -1))
    return torch.cat(columns).T


def _chunks(items: Iterable[Tensor], size: int) -> Iterator[list[Tensor]]:
    chunk: list[Tensor] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _steps_per_pass(batch_size: int | None, batch: int) -> int:
    if batch_size is None:
        return 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return max(1, batch_size // batch)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be a non-negative int, got {steps!r}")
    return steps


def _check_curve(curve: Tensor) -> None:
    if not isinstance(curve, Tensor) or curve.dim() != 2 or curve.shape[1] < 1:
        raise InputError("a curve is a (B, steps + 1) tensor as returned by region_perturbation")


# --- randomisation internals ---------------------------------------------------------------

def _layers_from_output(model: nn.Module, x: Tensor) -> list[str]:
    """Names of the Linear/Conv modules that run in forward, last executed first."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    seen: list[str] = []

    def record(module: nn.Module, *_: object) -> None:
        if names[module] not in seen:
            seen.append(names[module])

    handles = [m.register_forward_hook(record) for m in names]
    try:
        with torch.no_grad(), preserved(model, eval_mode=True):
            model(x.detach())
    finally:
        for h in handles:
            h.remove()
    return seen[::-1]


def _reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), seeded."""
    weight = module.weight
    fan_in = weight.shape[1] * weight[0, 0].numel()
    bound = fan_in ** -0.5
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            fresh = torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound,
                                                                     generator=generator)
            p.copy_(fresh)


def _explain(explain_fn: ExplainFn, model: nn.Module, x: Tensor, target: int | Tensor) -> Tensor:
    result = explain_fn(model, x, target)
    relevance = getattr(result, "relevance", result)
    if not isinstance(relevance, Tensor) or relevance.shape != x.shape:
        shape = tuple(relevance.shape) if isinstance(relevance, Tensor) else type(relevance)
        raise InputError(f"explain_fn returned {shape}; expected a tensor shaped like x "
                         f"{tuple(x.shape)}")
    return relevance.detach()


def _average_ranks(values: Tensor) -> Tensor:
    """(B, N) 1-based ranks per row; equal values get the mean of the ranks they span."""
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    for i, row in enumerate(values):
        ordered, index = row.sort()
        _, group, counts = torch.unique_consecutive(ordered, return_inverse=True,
                                                    return_counts=True)
        ends = counts.cumsum(0).double()
        ranks[i, index] = (ends - (counts.double() - 1) / 2)[group]
    return ranks


# --- shared ----------------------------------------------------------------------------------

def _check_image(x: Tensor, images_only: bool = True) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError("x must be a floating-point tensor")
    if images_only and x.dim() != 4:
        raise InputError(f"x has shape {tuple(x.shape)}; expected (B, C, H, W) images")
    if x.dim() < 2:
        raise InputError(f"x has shape {tuple(x.shape)}; expected a batch (B, ...)")
    return x.detach()


def _as_target(target: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """(B,) long class indices from an int, a 0-d tensor or a (B,) tensor."""
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    if isinstance(target, Tensor) and not (target.is_floating_point()
                                           or target.dtype == torch.bool):
        t = target.to(device=device, dtype=torch.long)
        t = t.expand(batch) if t.dim() == 0 else t
        if t.shape == (batch,):
            return t
    raise TargetError(f"target must be an int or a LongTensor of shape ({batch},), "
                      f"got {target!r}")


def _pick(output: Tensor, target: Tensor) -> Tensor:
    """output[i, target[i]] over the flattened output of each sample."""
    flat = output.reshape(output.shape[0], -1)
    if ((target < 0) | (target >= flat.shape[1])).any():
        raise TargetError(f"target out of range: the model has {flat.shape[1]} outputs")
    return flat.gather(1, target[:, None]).squeeze(1)
