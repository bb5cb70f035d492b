"""Hugging Face transformers explained unchanged, against the explicit AttnLRP reference.

tests/reference_attnlrp.py rebuilds each tiny model from its weights and sends
relevance back rule by rule (independent of relprop's trace); here relprop's
traced path on the unchanged models must agree with it, for eager and SDPA
attention. float64 throughout. With the sums' stabilizer at 0 both sides apply
the same formulas; with relprop's default stabilizer the two place it at
different sums (relprop: every traced binary add, the reference: one sum per
block), so only the stabilizer-free comparison is exact.
"""

from __future__ import annotations

import pytest
import torch
from checks import snapshot

import relprop
from relprop.errors import InputError, TargetError

ref = pytest.importorskip("reference_attnlrp")

IMPLS = ("eager", "sdpa")
IDS = torch.tensor([[3, 7, 11, 2, 9, 14, 5], [1, 2, 3, 4, 5, 6, 7]])


def _deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("epsilon", "impl"), [
    (1e-6, "eager"), (0.1, "sdpa"),  # each epsilon and each attention; the rest: make bench
    pytest.param(1e-6, "sdpa", marks=pytest.mark.slow),
    pytest.param(0.1, "eager", marks=pytest.mark.slow)])
def test_llama_matches_reference(impl: str, epsilon: float) -> None:
    model = ref.tiny_llama(0, impl)
    expl = relprop.Explainer(model, "attnlrp", epsilon=epsilon, stabilizer=0.0)
    for position in (6, 3):
        got = expl(IDS, target=(position, 4))
        want = ref.llama_relevance(model, IDS, position=position, token=4, epsilon=epsilon,
                                   stabilizer=0.0)
        # LLaMA's eager softmax and RMSNorm run in float32 even in a float64 model
        assert _deviation(got.embeddings, want) < 1e-6
        torch.testing.assert_close(got.relevance, want.sum(-1), rtol=0,
                                   atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
def test_gpt2_matches_reference(impl: str) -> None:
    model = ref.tiny_gpt2(0, impl)
    got = relprop.Explainer(model, "attnlrp", epsilon=1e-6, stabilizer=0.0)(IDS, target=4)
    want = ref.gpt2_relevance(model, IDS, position=-1, token=4, stabilizer=0.0)
    assert _deviation(got.embeddings, want) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_bert_matches_reference_with_padding(impl: str) -> None:
    model = ref.tiny_bert(0, impl)
    mask = torch.ones_like(IDS)
    mask[1, 5:] = 0
    got = relprop.Explainer(model, "attnlrp", epsilon=1e-6, stabilizer=0.0)(
        IDS, target=1, forward_kwargs={"attention_mask": mask})
    want = ref.bert_relevance(model, IDS, label=1, attention_mask=mask, stabilizer=0.0,
                              mask_rule="pass")
    assert _deviation(got.embeddings, want) < 1e-6
    assert torch.all(got.relevance[1, 5:] == 0)  # padded tokens take nothing


def test_attnlrp_defaults_are_lxts_and_a_stabilizer_stays_close() -> None:
    """attnlrp's defaults, as LXT: epsilon -> 0 on linear layers, sums unstabilized."""
    model = ref.tiny_llama(0, "sdpa")
    got = relprop.Explainer(model, "attnlrp")(IDS, target=4)
    want = ref.llama_relevance(model, IDS, token=4, epsilon=0.0, stabilizer=0.0)
    assert _deviation(got.embeddings, want) < 1e-6
    # with relprop's usual stabilizers (1e-6), placed at every traced sum here and once
    # per block in the reference
    got = relprop.Explainer(model, "attnlrp", epsilon=1e-6)(IDS, target=4)
    want = ref.llama_relevance(model, IDS, token=4)
    assert _deviation(got.embeddings, want) < 1e-5


def test_eager_and_sdpa_give_the_same_relevance() -> None:
    # eager's traced `scores + mask` passes relevance to the scores, as the SDPA kernel
    # does inside, so the two agree with the sums' default stabilizer too
    a = relprop.Explainer(ref.tiny_gpt2(0, "eager"), "attnlrp")(IDS, target=4)
    b = relprop.Explainer(ref.tiny_gpt2(0, "sdpa"), "attnlrp")(IDS, target=4)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=1e-9)


class ProbeAttention(torch.nn.Module):
    """Cross-attention from a learned probe (a constant query, as SigLIP's pooling head
    and a decoder's constant tokens give): SDPA, or the same written out with matmuls."""

    def __init__(self, sdpa: bool, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sdpa, self.probe = sdpa, torch.nn.Parameter(torch.randn(1, 1, d))
        self.k, self.v = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)
        self.head = torch.nn.Linear(d, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.probe.expand(x.shape[0], 1, -1), self.k(x), self.v(x)
        if self.sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5
            out = torch.softmax(scores, -1) @ v
        return self.head(out[:, 0])


@pytest.mark.parametrize("composite", ["attnlrp", "cp_lrp"])
def test_sdpa_with_a_constant_query_equals_its_written_out_twin(composite: str) -> None:
    """A product with one constant factor is linear in the other: with a constant query
    the keys take all of the scores' relevance (before: a quarter, half of it lost)."""
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    sdpa, eager = (relprop.Explainer(ProbeAttention(s).double().eval(), composite,
                                     stabilizer=0.0) for s in (True, False))
    a, b = sdpa(x, target=1, record=True), eager(x, target=1, record=True)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=1e-12)
    # only the softmax's Taylor rule leaks, and the ledger books it
    gap = a.explained - a.relevance.sum((1, 2))
    torch.testing.assert_close(a.ledger.totals()["leaked"], gap, rtol=1e-9, atol=1e-12)


def test_next_token_targets_and_positions() -> None:
    model = ref.tiny_llama(0, "sdpa")
    expl = relprop.Explainer(model, "attnlrp")
    last = expl(IDS, target=4)
    assert torch.equal(last.relevance, expl(IDS, target=(6, 4)).relevance)
    assert torch.equal(last.relevance, expl(IDS, target=4, position=-1).relevance)
    predicted = expl(IDS)
    logits = model(IDS).logits[:, -1]
    assert torch.equal(predicted.target % 50, logits.argmax(-1))
    several = expl(IDS, target=[[(5, 4), (6, 9)]])  # two tokens, one forward
    assert several.relevance.shape == (2, 2, 7)
    one = expl(IDS, target=(5, 4))
    torch.testing.assert_close(several.relevance[:, 0], one.relevance, rtol=0, atol=1e-12)
    # causal: positions after the explained one take nothing
    assert torch.all(one.relevance[:, 6] == 0)
    with pytest.raises(TargetError, match="position=9"):
        expl(IDS, target=4, position=9)


def test_another_batch_size_and_length_reuse_the_trace() -> None:
    model = ref.tiny_llama(0, "sdpa")
    expl = relprop.Explainer(model, "attnlrp")
    expl(IDS, target=4)
    short = IDS[:1, :5]
    got = expl(short, target=4)
    want = ref.llama_relevance(model, short, token=4, epsilon=0.0, stabilizer=0.0)
    assert _deviation(got.embeddings, want) < 1e-6
    assert len(expl._programs) == 1  # token ids: every size free


def test_explaining_leaves_the_model_untouched() -> None:
    model = ref.tiny_bert(0, "sdpa")
    model.train()
    before = snapshot(model)
    relprop.Explainer(model, "attnlrp")(IDS, target=0)
    assert snapshot(model) == before


def test_ledger_on_a_bias_free_llama_leaks_only_in_attention() -> None:
    model = ref.tiny_llama(0, "sdpa")
    expl = relprop.Explainer(model, "attnlrp", epsilon=0.0, stabilizer=0.0)(
        IDS[:1], target=4, record=True)
    # LLaMA's RMSNorm casts to float32 and back even in a float64 model: those casts round
    # (about 1e-7 of the relevance); anything more is a leak
    tol = 1e-6 * float(expl.explained[0])
    other = {e.node: float(e.other[0]) for e in expl.ledger.entries
             if abs(float(e.other[0])) > tol}
    assert other and all("attention" in n for n in other), other
    assert len(other) == model.config.num_hidden_layers  # one softmax rule per layer
    torch.testing.assert_close(float(expl.ledger.at_input[0]),
                               float(expl.explained[0]) - sum(other.values()), rtol=0,
                               atol=10 * tol)


@pytest.mark.slow  # CP-LRP's rule is checked by default against its matmul twin above
def test_cp_lrp_differs_from_attnlrp() -> None:
    model = ref.tiny_llama(0, "eager")
    a = relprop.Explainer(model, "attnlrp")(IDS, target=4).embeddings
    b = relprop.Explainer(model, "cp_lrp")(IDS, target=4).embeddings
    assert _deviation(b, a) > 0.05
    s = relprop.Explainer(ref.tiny_llama(0, "sdpa"), "cp_lrp")(IDS, target=4).embeddings
    torch.testing.assert_close(s, b, rtol=0, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("family", ["qwen2", pytest.param("mistral", marks=pytest.mark.slow)])
def test_other_causal_lm_configs_run(family: str) -> None:
    import transformers

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=50, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, use_cache=False, initializer_range=0.2)
    model = model_cls(config).eval()
    got = relprop.Explainer(model, "attnlrp")(IDS, target=4)
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0


def test_integer_input_without_embedding_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match="looks none of them up in an embedding"):
        relprop.Explainer(model)(torch.ones(2, 4, dtype=torch.long))


class _Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(self.proj(a), self.proj(b), dim=-1)


def test_cosine_similarity_splits_half_to_each_side() -> None:
    """Norms held constant, each product term halved: with LRP-0 below, each input gets
    exactly half of the cosine."""
    torch.manual_seed(0)
    model = _Pair().double()
    a, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    expl = relprop.Explainer(model, "lrp0")((a, b), output_relevance=model(a, b).detach())
    cos = model(a, b).detach()
    torch.testing.assert_close(expl.relevance[0].sum(1), cos / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(expl.relevance[1].sum(1), cos / 2, rtol=0, atol=1e-12)


class _Similarity(torch.nn.Module):
    """Cosine similarity of two mean-pooled sentence embeddings (sentence-transformers)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, a, b, mask_a, mask_b):
        return torch.nn.functional.cosine_similarity(self.embed(a, mask_a),
                                                     self.embed(b, mask_b), dim=-1)


def test_sentence_similarity_explains_both_sentences() -> None:
    model = _Similarity(ref.tiny_bert(0, "sdpa").bert)
    a, b = IDS[:1, :5], IDS[1:, :6]
    kw = {"mask_a": torch.ones_like(a), "mask_b": torch.ones_like(b)}
    expl = relprop.Explainer(model, "attnlrp")((a, b), forward_kwargs=kw,
                                               output_relevance=torch.ones(1, 1).double())
    ra, rb = expl.relevance
    assert ra.shape == a.shape and rb.shape == b.shape
    assert torch.isfinite(ra).all() and ra.abs().sum() > 0 and rb.abs().sum() > 0


def test_a_batch_of_one_traces_for_every_batch_size() -> None:
    model = ref.tiny_gpt2(0, "sdpa")
    expl = relprop.Explainer(model, "attnlrp")
    one = expl(IDS[:1], target=4)
    two = expl(IDS, target=4)
    torch.testing.assert_close(two.relevance[:1], one.relevance, rtol=0, atol=1e-12)


def test_gamma_on_linear_layers_is_an_option() -> None:
    model = ref.tiny_bert(0, "sdpa")
    expl = relprop.Explainer(model, "attnlrp", gamma=0.25)
    assert expl.composite.describe()["default"]["rule"] == "Gamma"
    assert relprop.Explainer(model, "attnlrp").composite.describe()["default"]["rule"] == \
        "LRP0"
    assert relprop.Explainer(model, "attnlrp", epsilon=0.1).composite.describe()[
        "default"]["rule"] == "Epsilon"
    got = expl(IDS, target=1)
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0


@pytest.mark.parametrize(("arch", "dtype"), [
    ("gpt2", torch.float16), pytest.param("llama", torch.bfloat16, marks=pytest.mark.slow),
    pytest.param("llama", torch.float16, marks=pytest.mark.slow),
    pytest.param("gpt2", torch.bfloat16, marks=pytest.mark.slow)])
def test_half_precision_models_are_explained_in_float32(arch: str, dtype: torch.dtype) -> None:
    """The trace's casts to the half type and its dtype checks follow the float32
    computation; the result equals the float32 explanation of the same rounded weights,
    up to the final rounding of the relevance to the half type."""
    model = getattr(ref, f"tiny_{arch}")(0, "sdpa").to(dtype)
    got = relprop.Explainer(model, "attnlrp")(IDS, target=4)
    assert got.relevance.dtype == dtype
    rounded = getattr(ref, f"tiny_{arch}")(0, "sdpa").to(dtype).float()
    want = relprop.Explainer(rounded, "attnlrp")(IDS, target=4).relevance
    assert _deviation(got.relevance.float(), want) < 1e-2


@pytest.mark.parametrize("seed", [0, 1, *(pytest.param(s, marks=pytest.mark.slow)
                                          for s in (2, 3))])
def test_random_llama_shapes_match_reference(seed: int) -> None:
    """Configurations nobody planned: random heads, grouped-query ratios, widths, depths,
    batch sizes, lengths and targets, against the explicit reference."""
    g = torch.Generator().manual_seed(100 + seed)

    def pick(*options: int) -> int:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    kv = pick(1, 2)
    heads = kv * pick(1, 2, 3)
    head_dim = pick(2, 4, 8)
    model = ref.tiny_llama(seed, pick(0, 1) and "sdpa" or "eager",
                           hidden_size=heads * head_dim, num_attention_heads=heads,
                           num_key_value_heads=kv, intermediate_size=pick(8, 24, 40),
                           num_hidden_layers=pick(1, 2, 3))
    B, T = pick(1, 2, 3), pick(2, 5, 9)
    ids = torch.randint(0, 50, (B, T), generator=g)
    position, token = pick(*range(T)), pick(0, 17, 49)
    got = relprop.Explainer(model, "attnlrp")(ids, target=(position, token))
    want = ref.llama_relevance(model, ids, position=position, token=token, epsilon=0.0,
                               stabilizer=0.0)
    assert _deviation(got.embeddings, want) < 1e-6


def test_causal_masks_are_recognised_and_biases_are_not() -> None:
    from relprop.rules.attention import is_causal_mask

    T = 5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert is_causal_mask(causal[None, None], T, T)
    additive = torch.zeros(1, 1, T, T).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert is_causal_mask(additive, T, T)
    assert not is_causal_mask(additive + 0.5 * causal, T, T)  # a bias where attended
    padded = causal.clone()
    padded[:, 0] = False  # left padding: not the plain causal mask
    assert not is_causal_mask(padded, T, T)
    assert not is_causal_mask(causal[:, :4], T, 4)


def test_repeated_keys_and_values_run_as_grouped_query_attention() -> None:
    from relprop.ops import is_op

    model = ref.tiny_llama(0, "sdpa")  # 4 query heads, 2 key-value heads
    expl = relprop.Explainer(model, "attnlrp")
    expl(IDS, target=4)
    (program,) = expl._programs.values()
    calls = [s.node for s in program.steps
             if is_op(s.node, "scaled_dot_product_attention")]
    assert len(calls) == model.config.num_hidden_layers
    assert all(n.kwargs.get("enable_gqa") for n in calls)
