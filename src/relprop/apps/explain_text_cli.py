"""`relprop explain-text`: token heatmaps for a Hugging Face text model, from local files.

A sequence classifier is explained at its predicted (or the given) class, a causal LM at
its next token (the last position's logit of the predicted or given token). A plain encoder
(AutoModel, sentence embeddings) has neither: the command says what to explain instead.
Writes tokens.html (every line), one PNG per line and relevance.json; prints the most
relevant tokens of each line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, RelpropError

TOP = 5


def add_parser(sub: Any) -> None:
    p = sub.add_parser("explain-text", help="token heatmaps for a Hugging Face text model",
                       description="Explain lines of text with a Hugging Face sequence "
                       "classifier (its predicted or a given class) or causal LM (its next "
                       "token), loaded from local files only. Writes tokens.html, a PNG per "
                       "line and relevance.json; prints the top tokens of each line.")
    p.add_argument("--model", required=True,
                   help="a save_pretrained folder or a Hugging Face name in the local cache")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a line to explain (may be repeated)")
    src.add_argument("--file", type=Path, help="a text file: one line to explain per line")
    p.add_argument("--target", help="classifier: a class index or label name (default: the "
                   "predicted class); causal LM: a token or token id (default: the predicted "
                   "next token)")
    p.add_argument("--composite", default="attnlrp", help="composite (default attnlrp)")
    p.add_argument("--out", type=Path, default=Path("relprop-out"), help="output folder")


def run(args: argparse.Namespace) -> Path:
    lines = _lines(args)
    model, tokenizer, kind = load_text_model(args.model)
    from ..explain import Explainer
    from ..visualize import token_html, token_png

    explainer = Explainer(model, args.composite)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    blocks, records = [], []
    for i, line in enumerate(lines):
        enc = tokenizer(line, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        scores = logits[0, -1] if kind == "causal" else logits[0]
        target = _target(args.target, kind, model, tokenizer, scores)
        with _quiet():
            expl = explainer(ids, target=target, forward_kwargs={"attention_mask": mask})
        relevance = expl.relevance[0].reshape(-1)
        tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
        name = _target_name(kind, model, tokenizer, target)
        label = f"{i + 1}. {name} (logit {float(scores[target]):.3g})"
        blocks.append(token_html(tokens, relevance, label=label))
        token_png(tokens, relevance, out / f"line_{i + 1:03d}.png", title=label)
        top = relevance.argsort(descending=True)[:TOP].tolist()
        print(f"{label}: " + ", ".join(f"{tokens[j]} {float(relevance[j]):+.3g}" for j in top))
        records.append({"line": line, "target": target, "target_name": name,
                        "logit": float(scores[target]), "tokens": tokens,
                        "relevance": [float(v) for v in relevance]})
    page = out / "tokens.html"
    page.write_text(_page(args.model, kind, args.composite, blocks), encoding="utf-8")
    (out / "relevance.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    print(f"wrote {page.resolve()} and {len(lines)} PNG(s)")
    return page


def load_text_model(name: str) -> tuple[torch.nn.Module, Any, str]:
    """(model in eval mode, tokenizer, "classifier" | "causal") from local files only; a
    plain encoder or an unknown head stops with what to use instead."""
    name = name.removeprefix("hf:")
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise RelpropError("explain-text needs transformers: pip install transformers"
                           ) from exc
    hf_logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load {name!r} from local files (a save_pretrained folder "
                         f"or the Hugging Face cache; nothing is downloaded): "
                         f"{str(exc).splitlines()[0]}") from exc
    arch = (config.architectures or ["?"])[0]
    if arch.endswith("ForSequenceClassification"):
        auto, kind = transformers.AutoModelForSequenceClassification, "classifier"
    elif arch.endswith(("ForCausalLM", "LMHeadModel")):
        auto, kind = transformers.AutoModelForCausalLM, "causal"
    else:
        raise InputError(
            f"{name} is a {arch} without a classification or language-model head: no class "
            "or next token to explain. For sentence embeddings explain a similarity of two "
            "sentences instead: relprop.apps.text.SentenceSimilarity(model) (cosine of the "
            "mean-pooled embeddings) with Explainer(..., 'attnlrp')((ids_a, ids_b), target=0,"
            " forward_kwargs={'mask_a': ..., 'mask_b': ...}), as `relprop demo` does; or "
            "load a *ForSequenceClassification / *ForCausalLM checkpoint")
    model = auto.from_pretrained(name, local_files_only=True).eval()
    return model, tokenizer, kind


def _lines(args: argparse.Namespace) -> list[str]:
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    else:
        lines = [ln for ln in args.text if ln.strip()]
    if not lines:
        raise InputError("no text to explain: give --text or a --file with non-empty lines")
    return lines


def _target(given: str | None, kind: str, model: Any, tokenizer: Any,
            scores: torch.Tensor) -> int:
    n = scores.shape[-1]
    if given is None:
        return int(scores.argmax())
    if given.lstrip("-").isdigit():
        index = int(given)
    elif kind == "classifier":
        labels = {str(k).lower(): int(v) for k, v in (model.config.label2id or {}).items()}
        if given.lower() not in labels:
            raise InputError(f"--target {given!r}: not a class index or label; labels are "
                             f"{sorted(labels)}")
        index = labels[given.lower()]
    else:
        pieces = tokenizer(given, add_special_tokens=False)["input_ids"]
        token = tokenizer.convert_tokens_to_ids(given)
        if token is not None and token != tokenizer.unk_token_id:
            pieces = [token]
        if len(pieces) != 1:
            raise InputError(f"--target {given!r} is {len(pieces)} tokens; give one token "
                             "or a token id")
        index = pieces[0]
    if not 0 <= index < n:
        raise InputError(f"--target {given}: out of range, the model has {n} outputs")
    return index


def _target_name(kind: str, model: Any, tokenizer: Any, target: int) -> str:
    if kind == "classifier":
        label = (model.config.id2label or {}).get(target)
        return f"class {target}" + (f" {label}" if label is not None else "")
    return f"next token {tokenizer.convert_ids_to_tokens(target)!r}"


def _page(model: str, kind: str, composite: str, blocks: list[str]) -> str:
    import html

    what = ("the predicted (or given) class" if kind == "classifier"
            else "the next token (last position)")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>relprop explain-text"
            f"</title></head><body><h1>relprop: {html.escape(model)}</h1><p>{composite}; "
            f"explained: {what}. Red: for it, blue: against it (each line scaled by its own "
            "largest |relevance|); hover over a token for its value.</p>"
            + "\n".join(blocks) + "</body></html>")


class _quiet:
    """torch.export's notes on specialised sizes are not for the command's user."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("torch._export")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
