"""Run LXT 2.1's efficient AttnLRP on a small Hugging Face model, in its own process.

Usage::

    python tests/oracles/lxt_run.py IN.pt OUT.pt

LXT (https://github.com/rachtibat/LRP-eXplains-Transformers) works by
monkey-patching classes and module globals of ``transformers`` and ``torch``
(``torch.nn.LayerNorm.forward``, ``torch.nn.Dropout.forward``, whole
``modeling_*`` modules). That is why this script must only ever run as a
separate interpreter: nothing it does may leak into the test process.

LXT 2.1 was written against transformers 4.x; on transformers 5.x it needs a
few shims, all installed by :func:`install_shims` before ``lxt`` is imported
or right after it patches (see tests/oracles/README.md for the why of each).

IN.pt (``torch.save``) holds a dict::

    arch                 "llama" | "bert" | "gpt2" | "gemma3"
    config               config.to_dict() of LlamaConfig / BertConfig / GPT2Config /
                         Gemma3TextConfig
    state_dict           weights of LlamaForCausalLM / BertForSequenceClassification /
                         GPT2LMHeadModel / Gemma3ForCausalLM
    input_ids            LongTensor (B, T)
    attention_mask       optional LongTensor (B, T)
    target               {"position": int, "token": int} (causal LMs) or {"label": int} (BERT)
    attn_implementation  "eager" | "sdpa"  (optional, default "eager")

OUT.pt holds::

    relevance    (B, T, D) float32: inputs_embeds * inputs_embeds.grad
    logits       (B,) float32: the target logit of every row
    logit        float: the target logit of row 0
    lxt_version  the installed LXT version string
    shims        names of the shims installed so far in this process

IN.pt may also hold a list of such dicts (any mix of architectures); OUT.pt
then holds the list of results, in order. One interpreter start (importing
transformers and LXT) costs far more than a tiny model's pass.

Relevance starts from the target logit's value. In LXT's efficient mode the
relevance of a tensor ``t`` is ``t * t.grad``, so that start is a backward
seeded with 1 (``logit.backward()``, as in LXT's README for this mode).
``logit.backward(logit)`` is the idiom of LXT's *explicit* mode, where
gradients are relevances; here it would multiply every relevance by the logit.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
import warnings

import torch

SHIMS: list[str] = []


# --------------------------------------------------------------------------
# Shims for transformers 5.x (installed before ``import lxt``)
# --------------------------------------------------------------------------

def _expand_padding_mask(mask: torch.Tensor, dtype: torch.dtype,
                         tgt_len: int | None) -> torch.Tensor:
    """(B, S) 1/0 keep-mask -> additive (B, 1, tgt_len, S) mask (0 keep, dtype-min drop)."""
    bsz, src_len = mask.shape
    tgt_len = src_len if tgt_len is None else tgt_len
    keep = mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    return (1.0 - keep).masked_fill((1.0 - keep).bool(), torch.finfo(dtype).min)


def _prepare_4d_attention_mask_for_sdpa(mask, dtype, tgt_len=None):
    # transformers 4.x semantics: no mask at all when nothing is padded, so
    # SDPA can take its unmasked path; otherwise the additive 4-D mask.
    if bool(torch.all(mask == 1)):
        return None
    return _expand_padding_mask(mask, dtype, tgt_len)


def _prepare_4d_causal_attention_mask_for_sdpa(*args, **kwargs):
    # Only BERT-as-decoder reaches this; the oracle runs BERT as an encoder.
    raise NotImplementedError("lxt_run shim: causal BERT masks are not supported by the oracle")


def _find_pruneable_heads_and_indices(*args, **kwargs):
    # Imported by LXT's BERT module, only called when pruning heads.
    raise NotImplementedError("lxt_run shim: head pruning is not supported by the oracle")


def install_shims() -> None:
    """Put back the transformers 4.x names that ``lxt.efficient.models.bert`` imports."""
    import transformers.pytorch_utils as pytorch_utils

    name = "transformers.modeling_attn_mask_utils"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        shim = types.ModuleType(name)
        shim.__doc__ = "lxt_run shim for the module removed in transformers 5"
        shim._prepare_4d_attention_mask_for_sdpa = _prepare_4d_attention_mask_for_sdpa
        shim._prepare_4d_causal_attention_mask_for_sdpa = _prepare_4d_causal_attention_mask_for_sdpa
        sys.modules[name] = shim
        import transformers
        transformers.modeling_attn_mask_utils = shim
        SHIMS.append(name)
    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices
        SHIMS.append("transformers.pytorch_utils.find_pruneable_heads_and_indices")


# --------------------------------------------------------------------------
# Adapters applied after LXT has patched
# --------------------------------------------------------------------------

class _AttentionDict(dict):
    """A plain dict with the ``get_interface`` lookup transformers 5.x calls.

    LXT's ``patch_attention`` rebinds ``modeling_x.ALL_ATTENTION_FUNCTIONS``
    to a plain dict of wrapped functions; transformers 5.x attention layers
    call ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)``.
    """

    def get_interface(self, attn_implementation, default):
        if attn_implementation in (None, "eager"):
            return default
        if attn_implementation not in self:
            raise KeyError(f"lxt_run: attention implementation {attn_implementation!r} not patched")
        return self[attn_implementation]


def _fix_attention_registry(module) -> None:
    registry = module.ALL_ATTENTION_FUNCTIONS
    if isinstance(registry, dict) and not hasattr(registry, "get_interface"):
        module.ALL_ATTENTION_FUNCTIONS = _AttentionDict(registry)
        SHIMS.append(f"{module.__name__}.ALL_ATTENTION_FUNCTIONS.get_interface")


def _get_head_mask(self, head_mask, num_hidden_layers):
    if head_mask is not None:
        raise NotImplementedError("lxt_run shim: head masks are not supported by the oracle")
    return [None] * num_hidden_layers


def _get_extended_attention_mask(self, attention_mask, input_shape, *args, **kwargs):
    if attention_mask.dim() != 2:
        raise NotImplementedError("lxt_run shim: only (B, S) attention masks are supported")
    return _expand_padding_mask(attention_mask, self.dtype, None)[:, :, :1, :]


def _fix_bert(modeling_bert) -> None:
    """Give LXT's transformers-4 ``BertPreTrainedModel`` the helpers 5.x dropped."""
    base = modeling_bert.BertPreTrainedModel
    if not hasattr(base, "get_head_mask"):
        base.get_head_mask = _get_head_mask
        SHIMS.append("BertPreTrainedModel.get_head_mask")
    if not hasattr(base, "get_extended_attention_mask"):
        base.get_extended_attention_mask = _get_extended_attention_mask
        SHIMS.append("BertPreTrainedModel.get_extended_attention_mask")


# --------------------------------------------------------------------------
# Model building and the LRP pass
# --------------------------------------------------------------------------

_PATCHED: set[str] = set()


def build_patched_model(arch: str, config_dict: dict, state_dict: dict, attn_implementation: str):
    install_shims()
    from lxt.efficient import monkey_patch

    if arch == "llama":
        from transformers.models.llama import modeling_llama as module
        from transformers.models.llama.configuration_llama import LlamaConfig as config_cls
        model_cls_name = "LlamaForCausalLM"
    elif arch == "gpt2":
        from transformers.models.gpt2 import modeling_gpt2 as module
        from transformers.models.gpt2.configuration_gpt2 import GPT2Config as config_cls
        model_cls_name = "GPT2LMHeadModel"
    elif arch == "bert":
        from transformers.models.bert import modeling_bert as module
        from transformers.models.bert.configuration_bert import BertConfig as config_cls
        model_cls_name = "BertForSequenceClassification"
    elif arch == "gemma3":
        from transformers.models.gemma3 import modeling_gemma3 as module
        from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig as config_cls
        model_cls_name = "Gemma3ForCausalLM"
    else:
        raise ValueError(f"unknown arch {arch!r}")
    if arch not in _PATCHED:  # LXT warns (and skips) when patching twice
        with warnings.catch_warnings():
            # torch.nn.LayerNorm / Dropout are patched by more than one map
            warnings.filterwarnings("ignore", message=".*already patched")
            warnings.filterwarnings("ignore", message="Failed to patch (LayerNorm|Dropout)")
            monkey_patch(module)
        if arch == "bert":
            # LXT replaced every attribute of transformers' modeling_bert with
            # its own (transformers-4 era) copy: the class is looked up below.
            _fix_bert(module)
        else:
            _fix_attention_registry(module)
        _PATCHED.add(arch)

    config = config_cls.from_dict(config_dict)
    config._attn_implementation = attn_implementation
    if arch == "bert" and not hasattr(config, "position_embedding_type"):
        # transformers 5 dropped relative position embeddings from BERT (and
        # the config field); LXT's copy still reads it.
        config.position_embedding_type = "absolute"
        if "BertConfig.position_embedding_type" not in SHIMS:
            SHIMS.append("BertConfig.position_embedding_type")
    model = getattr(module, model_cls_name)(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Non-persistent buffers (position ids, rotary frequencies) may be absent
    # from the saved weights; real parameters must all be there.
    params = dict(model.named_parameters())
    missing_params = [k for k in missing if k in params]
    if missing_params or unexpected:
        raise RuntimeError(f"weights do not fit: missing {missing_params}, unexpected {unexpected}")
    return model.float().eval()


def run(payload: dict) -> dict:
    torch.manual_seed(0)
    arch = payload["arch"]
    model = build_patched_model(arch, payload["config"], payload["state_dict"],
                                payload.get("attn_implementation", "eager"))
    input_ids = payload["input_ids"]
    attention_mask = payload.get("attention_mask")
    target = payload["target"]

    embeds = model.get_input_embeddings()(input_ids).detach().float().requires_grad_(True)
    kwargs = {"inputs_embeds": embeds}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if arch != "bert":
        kwargs["use_cache"] = False
    logits = model(**kwargs).logits
    if arch == "bert":
        logit = logits[:, target["label"]]
    else:
        logit = logits[:, target["position"], target["token"]]
    # Efficient mode: the relevance of any tensor t is t * t.grad, so the
    # relevance at the logit is logit * seed; a seed of 1 (LXT README's
    # ``logits[...].backward()``) starts from R = the logit's value.
    logit.backward(torch.ones_like(logit))

    relevance = (embeds * embeds.grad).detach().float()
    return {
        "relevance": relevance,
        "logits": logit.detach().float(),
        "logit": float(logit[0].detach()),
        "lxt_version": importlib.metadata.version("lxt"),
        "shims": list(SHIMS),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    payload = torch.load(argv[1], weights_only=False)
    if isinstance(payload, list):  # many cases, one interpreter start
        torch.save([run(p) for p in payload], argv[2])
    else:
        torch.save(run(payload), argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
