"""Tiny random transformer families (issue 19) built offline from their config classes,
and explicit layer-by-layer AttnLRP references for the ones whose rules go beyond
tests/reference_attnlrp.py (mixture-of-experts, encoder-decoders, CLIP, Mamba).

Like tests/reference_attnlrp.py, each reference rebuilds the model from its state dict
and sends relevance back rule by rule as relevance tensors (R per tensor), sharing no
code with relprop or with the Hugging Face modules' forward; the rules are AttnLRP's
(reference_attnlrp's docstring) plus those issue 19 adds:

- casts (`type_as`, `.to(dtype)`): identity;
- a mixture-of-experts layer: the router's choice (top-k) and its routing weights
  (renormalised or not) are held constant, so each chosen expert's output takes its
  share of the weighted sum in proportion to it (the weights being constant scales);
- T5's RMSNorm: identity; its relative position bias: a constant summand of the scores;
- CLIP's L2 normalisation: the norm held constant; pooling at the end-of-sequence
  token: the pooled row's relevance goes back to that token;
- Mamba's selective scan: the input-dependent Delta, A, B and C held constant, so the
  scan is linear in its input; SiLU identity; the gate y * silu(z) uniform.

Every model is float64 unless a test says otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

F64 = torch.float64

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             use_cache=False, initializer_range=0.2)


def _build(cls: Any, config: Any, seed: int, attn_implementation: str | None) -> Any:
    torch.manual_seed(seed)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = cls._from_config(config, dtype=F64, **kw)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # non-trivial norm weights and biases (HF starts them at 1 and 0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return model.eval()


# --------------------------------------------------------------------------- Gemma


def tiny_gemma2(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = {**SMALL, "head_dim": 8, "sliding_window": 4, **overrides}
    return _build(Gemma2ForCausalLM, Gemma2Config(**kw), seed, attn_implementation)


def tiny_gemma3(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = {**SMALL, "head_dim": 8, "sliding_window": 4, **overrides}
    return _build(Gemma3ForCausalLM, Gemma3TextConfig(**kw), seed, attn_implementation)


# --------------------------------------------------------------------------- encoder-decoders


def tiny_t5(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    kw = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16,
              use_cache=False, decoder_start_token_id=0, dropout_rate=0.0,
              initializer_factor=1.0)
    kw.update(overrides)
    return _build(T5ForConditionalGeneration, T5Config(**kw), seed, attn_implementation)


def tiny_whisper(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    kw = dict(vocab_size=50, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
              decoder_ffn_dim=64, d_model=32, max_source_positions=8,
              max_target_positions=16, use_cache=False, decoder_start_token_id=1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return _build(WhisperForConditionalGeneration, WhisperConfig(**kw), seed,
                  attn_implementation)


# --------------------------------------------------------------------------- BLOOM


def tiny_bloom(seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    from transformers import BloomConfig, BloomForCausalLM

    kw = dict(vocab_size=50, hidden_size=32, n_layer=2, n_head=4, use_cache=False,
              initializer_range=0.2, hidden_dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    return _build(BloomForCausalLM, BloomConfig(**kw), seed, attn_implementation)
