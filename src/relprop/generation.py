"""Explaining generation: greedy decoding, then every generated token explained.

`explain_generation(model, ids, max_new_tokens=N)` decodes N tokens greedily (argmax,
no sampling), then explains the logit of each generated token at the position that
predicted it, with respect to the prompt and the tokens generated before it. All N
explanations share ONE forward pass over the full sequence (prompt + generated): the N
targets are (position, token) pairs of one multi-target explanation, one backward pass
each (relprop.Explainer, relprop.targets).

The decoding loop is relprop's own (no `model.generate`): it needs nothing but a
model whose output holds (B, T, V) next-token logits, and runs with the model in
inference semantics, as the explanation does. Where the forward takes a key-value
cache (Hugging Face's decoders: `cache`, or `past_key_values`, and `use_cache`) and
returns one, each step reads the new token only; otherwise each step recomputes the
whole sequence. With `eos_token_id`, a
sample that produced it is finished: its later tokens are `pad_token_id`, their rows
hold 0, and decoding stops when every sample is finished (`Generation.lengths`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import targets
from .composites import Composite
from .contrast import contrast
from .errors import InputError
from .explain import Explainer, Explanation
from .trace import preserved

__all__ = ["Generation", "explain_generation", "generate_explained", "greedy", "mask_keywords"]


@dataclass
class Generation:
    """N greedily generated tokens and the relevance of the sequence for each.

    ids: (B, T) prompt + generated (T = P + N). tokens: (B, N) the generated ones
    (`ids[:, P:]`). relevance: (B, N, T): row n is the explanation of the n-th
    generated token's logit (at position P - 1 + n); positions from P + n on (the
    token itself and later ones) are exactly 0. explained: (B, N) those logits (the
    relevance put at the output). attention_mask: (B, T) or None.
    """

    ids: Tensor
    tokens: Tensor
    relevance: Tensor
    explained: Tensor
    prompt_length: int
    attention_mask: Tensor | None = None
    lengths: Tensor | None = None
    _explainer: Explainer | None = field(default=None, repr=False, compare=False)
    _forward_kwargs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def position(self, n: int) -> int:
        """The position whose logits predicted the n-th generated token."""
        N = self.tokens.shape[1]
        if not -N <= n < N:
            raise InputError(f"step {n} is out of range for {N} generated tokens")
        return self.prompt_length - 1 + n % N

    def contrast(self, n: int, other: int | list[int] | Tensor) -> Explanation:
        """Why the n-th generated token and not `other` (one token for every sample, or
        one per sample): the explanation of logit(generated) - logit(other) at the
        position that predicted it. One more forward and backward pass."""
        if self._explainer is None:
            raise InputError("this Generation does not know its model; use "
                             "relprop.contrast with an Explainer")
        p = self.position(n)
        batch = self.ids.shape[0]
        others = other.tolist() if isinstance(other, Tensor) else other
        others = [others] * batch if isinstance(others, int) else list(others)
        if len(others) != batch:
            raise InputError(f"{len(others)} alternatives for a batch of {batch}")
        chosen = [(p, int(t)) for t in self.tokens[:, n % self.tokens.shape[1]]]
        return self._explainer(self.ids, target=contrast(chosen, [(p, int(t)) for t in others]),
                               forward_kwargs=self._forward_kwargs)

    def to_html(self, tokens: Any = None, path: str | Path | None = None) -> str:
        """Self-contained HTML (inline CSS and JS): hovering a generated token colours its
        context by relevance. `tokens`: a tokenizer, one sample's token strings, one list
        per sample, or None (the ids)."""
        from .generation_views import html_page

        return html_page(self, tokens, path)

    def to_png(self, path: str | Path, tokens: Any = None, sample: int = 0) -> Path:
        """The (N, T) relevance matrix of one sample as a PNG (matplotlib, `relprop[viz]`)."""
        from .generation_views import matrix_png

        return matrix_png(self, path, tokens, sample)

    def to_latex(self, tokens: Any = None, sample: int = 0) -> str:
        """One paragraph per generated token: its context as xcolor \\colorbox es, the
        token itself framed (\\usepackage{xcolor})."""
        from .generation_views import latex

        return latex(self, tokens, sample)


def explain_generation(model: nn.Module, input_ids: Tensor, max_new_tokens: int, *,
                       composite: str | Composite = "attnlrp", attention_mask: Tensor | None = None,
                       eos_token_id: int | Sequence[int] | None = None,
                       pad_token_id: int | None = None, **explainer_kwargs: Any) -> Generation:
    """Greedy generation of up to `max_new_tokens` tokens, each explained (see the
    module). `explainer_kwargs`: the composite's parameters, as relprop.Explainer takes
    them."""
    explainer = Explainer(model, composite, **explainer_kwargs)
    return generate_explained(explainer, input_ids, max_new_tokens, attention_mask,
                              eos_token_id, pad_token_id)


def generate_explained(explainer: Explainer, input_ids: Tensor, max_new_tokens: int,
                       attention_mask: Tensor | None = None,
                       eos_token_id: int | Sequence[int] | None = None,
                       pad_token_id: int | None = None) -> Generation:
    """explain_generation with an Explainer already built (Explainer.explain_generation)."""
    ids, mask, lengths = greedy(explainer.model, input_ids, max_new_tokens, attention_mask,
                                eos_token_id, pad_token_id)
    B, P, T = ids.shape[0], input_ids.shape[-1], ids.shape[1]
    N = T - P
    kw = mask_keywords(explainer.model, mask)
    wanted = [[(P - 1 + n, int(t)) for n, t in enumerate(row)] for row in ids[:, P:].tolist()]
    expl = explainer(ids, target=wanted, forward_kwargs=kw)
    rel = expl.relevance.reshape(B, N, T)
    before = torch.arange(T)[None, :] < (P + torch.arange(N))[:, None]  # (N, T)
    made = torch.arange(N)[None, :] < lengths[:, None]  # (B, N): not padding after the end
    zero = torch.zeros((), dtype=rel.dtype, device=rel.device)
    rel = torch.where((before[None] & made[:, :, None]).to(rel.device), rel, zero)
    explained = torch.where(made.to(rel.device), expl.explained.reshape(B, N), zero)
    return Generation(ids=ids, tokens=ids[:, P:], relevance=rel, explained=explained,
                      prompt_length=P, attention_mask=mask, lengths=lengths,
                      _explainer=explainer, _forward_kwargs=kw)


@torch.no_grad()
def greedy(model: nn.Module, input_ids: Tensor, max_new_tokens: int,
           attention_mask: Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
           pad_token_id: int | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Prompt + up to `max_new_tokens` argmax tokens (B, P + N), the attention mask grown
    with them (ones), and the tokens each sample generated (B,), in inference semantics.
    A left-padded prompt (zeros in its mask) gets position ids counted from its first
    real token where the model takes them."""
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError(f"input_ids has shape {tuple(input_ids.shape)} and dtype "
                         f"{input_ids.dtype}; give (B, T) integer token ids")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                         f"the ids' {tuple(input_ids.shape)}")
    stops = torch.tensor([] if eos_token_id is None else
                         [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                         dtype=input_ids.dtype, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else int(stops[0]) if len(stops) else 0
    B = input_ids.shape[0]
    ids, mask, past = input_ids, attention_mask, None
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long)
    cache_keyword = _cache_keyword(model)
    cached = cache_keyword is not None
    with preserved(model, eval_mode=True):
        for step in range(max_new_tokens):
            kw = mask_keywords(model, mask)
            fed = ids
            if cached:
                kw["use_cache"] = True
                if past is not None:  # the cache holds the rest: read the new token only
                    kw[cache_keyword] = past
                    fed = ids[:, -1:]
                    if "position_ids" in kw:
                        kw["position_ids"] = kw["position_ids"][:, -1:]
            out = model(fed, **kw)
            past = _returned_cache(out) if cached else None
            cached = cached and past is not None  # no cache came back: recompute from now
            logits = targets.logits(out)
            if logits.dim() != 3:
                raise InputError(f"the model returned logits of shape {tuple(logits.shape)}; "
                                 "generation needs (B, T, V) next-token logits")
            if not torch.isfinite(logits[:, -1]).all():
                b = int((~torch.isfinite(logits[:, -1])).any(-1).nonzero()[0])
                raise InputError(f"step {step}: the model's next-token logits of sample {b} "
                                 "are not finite (NaN or Inf), so no token can be chosen; the "
                                 "model computes them so without relprop")
            nxt = logits[:, -1].argmax(-1).to(ids.dtype)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            ended = ~done & torch.isin(nxt, stops)
            lengths[ended.cpu()] = step + 1
            done |= ended
            if bool(done.all()):
                break
    generated = ids.shape[1] - input_ids.shape[1]
    return ids, mask, torch.where(done.cpu(), lengths, torch.full_like(lengths, generated))


def _cache_keyword(model: nn.Module) -> str | None:
    """The forward's key-value cache keyword (Hugging Face's `cache`, `past_key_values`
    before transformers 5.x), where it also takes `use_cache`."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "use_cache" not in parameters:
        return None
    return next((k for k in ("cache", "past_key_values") if k in parameters), None)


def _returned_cache(out: Any) -> Any:
    """The cache a forward returned (`cache`, or `past_key_values` before 5.x), or None."""
    if not hasattr(out, "keys"):
        return None
    return next((out[k] for k in ("cache", "past_key_values") if out.get(k) is not None), None)


def mask_keywords(model: nn.Module, mask: Tensor | None) -> dict[str, Any]:
    """The forward's keywords for a mask: the mask, and position ids where it pads."""
    if mask is None:
        return {}
    kw: dict[str, Any] = {"attention_mask": mask}
    if not bool(mask.all()) and "position_ids" in inspect.signature(model.forward).parameters:
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return kw
