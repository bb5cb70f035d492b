"""LXT 2.1's efficient AttnLRP on bench_transformers.py's LLaMA, timed in its own interpreter.

LXT monkey-patches transformers (and torch.nn.Dropout), so it never runs in the
benchmark's process. The transformers-5 shims are tests/oracles/lxt_run.py's.
The patch is recorded as the attributes it changed (module globals of
modeling_llama, ``forward`` of LlamaMLP / LlamaRMSNorm / Dropout) and switched
on for LXT's calls and off for the plain gradient's, so that both are timed on
the same model in the same process, interleaved round by round.

    python benchmarks/lxt_child.py time ATTN SEQ REPEATS      # {"gradient": .., "lxt": ..}
    python benchmarks/lxt_child.py memory ATTN SEQ gradient|lxt   # {"mem": bytes}
"""

from __future__ import annotations

import json
import os
import resource
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests", "oracles"))

import bench_transformers as bench  # noqa: E402
import lxt_run  # noqa: E402  (tests/oracles: the transformers-5 shims)
import torch  # noqa: E402


class Patch:
    """LXT's efficient patch of modeling_llama, as attribute changes that can be toggled."""

    def __init__(self) -> None:
        lxt_run.install_shims()
        import torch.nn as nn
        from transformers.models.llama import modeling_llama as module

        owners = [module, module.LlamaMLP, module.LlamaRMSNorm, nn.Dropout]
        before = [dict(vars(o)) for o in owners]
        from lxt.efficient import monkey_patch

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*already patched")
            warnings.filterwarnings("ignore", message="Failed to patch (LayerNorm|Dropout)")
            monkey_patch(module)
        lxt_run._fix_attention_registry(module)  # .get_interface for transformers 5
        self.changes = []
        missing = object()
        for owner, old in zip(owners, before, strict=True):
            new = dict(vars(owner))
            for name in {*old, *new}:
                if old.get(name, missing) is not new.get(name, missing):
                    self.changes.append((owner, name, old.get(name, missing),
                                         new.get(name, missing)))
        self.missing = missing
        if not self.changes:
            raise RuntimeError("LXT patched nothing")

    def set(self, on: bool) -> None:
        for owner, name, old, new in self.changes:
            value = new if on else old
            if value is self.missing:
                if name in vars(owner):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)


def relevance_fn(model):
    embed = model.get_input_embeddings()

    def run(ids):
        # Efficient mode: relevance = input * gradient, seeded with 1 at the logit.
        e = embed(ids).detach().requires_grad_()
        logits = model(inputs_embeds=e).logits
        (g,) = torch.autograd.grad(logits[:, -1, bench.TOKEN].sum(), e)
        return (g * e).sum(-1)
    return run


def main(argv: list[str]) -> int:
    torch.set_num_threads(bench.threads())
    mode, attn, seq = argv[1], argv[2], int(argv[3])
    patch = Patch()
    model = bench.build_llama(attn)
    fn = relevance_fn(model)  # plain gradient x input with the patch off, LXT with it on
    if mode == "time":
        repeats = int(argv[4])
        ids = bench.llama_ids(seq)
        result = bench.timed_rounds({"gradient": fn, "lxt": fn}, ids, repeats,
                                    before=lambda name: patch.set(name == "lxt"))
        result["patched"] = [f"{getattr(o, '__name__', o)}.{n}" for o, n, _, _ in patch.changes]
        print(json.dumps(result))
    elif mode == "memory":
        patch.set(argv[4] == "lxt")
        fn(bench.llama_ids(16))  # warm-up on a small input, as bench_transformers.py
        ids = bench.llama_ids(seq)
        base = bench.rss_bytes()
        fn(ids)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"mem": max(peak - base, 0)}))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
