"""Transformers: time and peak memory of relprop's AttnLRP against the plain gradient and LXT 2.1.

Rows (issue 12): a small random-weight LLaMA (4 layers, hidden 256, 8 heads, 4 KV
heads) on 2,048 tokens, batch 1, SDPA and eager attention, target the next-token
logit; and torchvision's ViT-B/16 (random weights) at batch 8, 224 px.

Methods:

* ``gradient``: gradient x input at the input embeddings (LLaMA:
  ``model(inputs_embeds=e)`` with ``e`` requiring grad, backward of the target
  logit; ViT: at the pixels), summed over the embedding dimension as relprop's
  token relevance is.
* ``relprop``: ``relprop.Explainer(model, "attnlrp")(ids, target=tok)``, the
  Explainer built once outside the timing.
* ``lxt``: LXT 2.1's efficient AttnLRP (benchmarks/lxt_child.py, always in a
  child interpreter because LXT monkey-patches transformers). Its ratios are to
  ``gradient (LXT child)``, the plain gradient of the *unpatched* model measured
  in that same child, interleaved with LXT round by round (the patch is switched
  on and off between calls).

How it is measured (as benchmarks/bench_speed.py): time: one subprocess per
model warms every method up once on the full input, then runs them in turn,
round after round, and reports each one's median; ratios are to the gradient of
the same subprocess. Peak memory: every (model, method) cell in its own
subprocess, which warms the method up once on a small input (16 tokens or one
image: torch.export tracing, one-off caches) and then reports ru_maxrss above
the resident size just before the full-size call.

    python benchmarks/bench_transformers.py                        # all rows, 5 rounds
    python benchmarks/bench_transformers.py --markdown docs/benchmarks.md  # + docs section
    python benchmarks/bench_transformers.py --profile llama:sdpa   # torch.profiler, by op
    python benchmarks/bench_transformers.py --saved llama:sdpa     # saved tensors by node
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

LLAMA = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
             use_cache=False)
TOKEN = 7  # target: the next-token logit of this token id at the last position
CLASS = 3  # target class of the ViT rows
MODELS = ["llama:sdpa", "llama:eager", "vit_b_16"]
# issue 19's rows: the same shape as LLAMA in each family (MoE: 8 experts, 2 per token);
# Mamba's pure-PyTorch scan is a Python loop over the tokens, unrolled by the trace
FAMILIES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=32, sliding_window=512)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0)),
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(state_size=16, expand=2, conv_kernel=4, use_mambapy=False)),
    # Mamba2's chunked scan has no Python loop over the tokens: one trace, any length
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM",
               dict(state_size=16, expand=2, conv_kernel=4, num_heads=8, head_dim=64,
                    n_groups=1, chunk_size=256)),
}
SSM = ("mamba", "mamba2")  # no attention: LLaMA's attention sizes do not apply
TIME_TARGET, MEM_TARGET = 1.2, 1.3  # issue 12


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Return freed heap to the system and restart the peak RSS (Linux: VmHWM), so that
    the peak measured next is the next call's, not an earlier warm-up's or trace's."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def threads() -> int:
    return int(os.environ.get("BENCH_THREADS", "2"))


# ----------------------------------------------------------------------------- models

def build_llama(attn: str, family: str = "llama"):
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(**LLAMA)
        cls = transformers.LlamaForCausalLM
    else:
        config_name, cls_name, extra = FAMILIES[family]
        kw = {**LLAMA, **extra}
        if family in SSM:
            kw = {k: v for k, v in kw.items() if k not in (
                "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings")}
        config = getattr(transformers, config_name)(**kw)
        cls = getattr(transformers, cls_name)
    if attn:
        config._attn_implementation = attn
    return cls(config).float().eval()


def is_lm(model_key: str) -> bool:
    return model_key.partition(":")[0] in ("llama", *FAMILIES)


def llama_ids(seq: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, LLAMA["vocab_size"], (1, seq), generator=gen)


def build(model_key: str):
    import torch

    if is_lm(model_key):
        family, _, attn = model_key.partition(":")
        return build_llama(attn, family)
    torch.manual_seed(0)
    if model_key == "hf_vit":  # transformers' ViT-Base (ViTConfig() defaults)
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig()).float().eval()
    import torchvision

    return getattr(torchvision.models, model_key)(weights=None).eval()


def make_input(model_key: str, seq: int, batch: int, small: bool = False):
    import torch

    if is_lm(model_key):
        return llama_ids(16 if small else seq)
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1 if small else batch, 3, 224, 224, generator=gen)


def method_fn(model_key: str, model, method: str):
    """A function of the input (token ids or images) that returns the relevance."""
    import torch

    llama = is_lm(model_key)
    if method == "gradient":
        if llama:
            embed = model.get_input_embeddings()

            def run(ids):
                e = embed(ids).detach().requires_grad_()
                logits = model(inputs_embeds=e).logits
                (g,) = torch.autograd.grad(logits[:, -1, TOKEN].sum(), e)
                return (g * e).sum(-1)
            return run

        def run(x):
            x = x.detach().requires_grad_()
            out = model(x)
            out = getattr(out, "logits", out)
            (g,) = torch.autograd.grad(out[:, CLASS].sum(), x)
            return g * x
        return run
    if method == "relprop":
        import relprop

        explainer = relprop.Explainer(model, "attnlrp")
        target = TOKEN if llama else CLASS
        return lambda x: explainer(x, target=target).relevance
    raise ValueError(method)


# ----------------------------------------------------------------------------- workers

def memory_worker(model_key: str, method: str, seq: int, batch: int) -> dict:
    import torch

    torch.set_num_threads(threads())
    model = build(model_key)
    fn = method_fn(model_key, model, method)
    x = make_input(model_key, seq, batch)
    fn(x)  # tracing (a trace that fixes the length, as Mamba's loop does, traces here)
    reset_peak()
    base = rss_bytes()
    fn(x)
    return {"mem": max(peak_bytes() - base, 0)}


def timed_rounds(fns: dict, x, repeats: int, before=None) -> dict:
    """Warm each up once, then `repeats` interleaved rounds; medians per method."""
    for name, fn in fns.items():
        if before:
            before(name)
        fn(x)
    wall = {m: [] for m in fns}
    user = {m: [] for m in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before:
                before(name)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            fn(x)
            wall[name].append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            user[name].append(r1.ru_utime - r0.ru_utime)
    return {m: {"time": statistics.median(wall[m]), "user": statistics.median(user[m]),
                "rounds": [round(w, 3) for w in wall[m]]} for m in fns}


def time_worker(model_key: str, methods: list[str], seq: int, batch: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads())
    model = build(model_key)
    fns, errors = {}, {}
    for method in methods:
        try:
            fns[method] = method_fn(model_key, model, method)
        except Exception as exc:
            errors[method] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
    return {**timed_rounds(fns, make_input(model_key, seq, batch), repeats), **errors}


def run_worker(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": err[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- diagnostics

def profile(model_key: str, seq: int, batch: int, rows: int, memory: bool) -> None:
    """torch.profiler by op: one relprop call against one gradient call, and the differences."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(threads())
    model = build(model_key)
    x = make_input(model_key, seq, batch)
    stats = {}
    for method in ("gradient", "relprop"):
        fn = method_fn(model_key, model, method)
        fn(x)
        with tprofile(activities=[ProfilerActivity.CPU], profile_memory=memory) as prof:
            fn(x)
        avgs = prof.key_averages()
        key = "self_cpu_memory_usage" if memory else "self_cpu_time_total"
        print(f"\n== {model_key} {method}: top {rows} ops by {key}")
        print(avgs.table(sort_by=key, row_limit=rows))
        stats[method] = {e.key: (e.self_cpu_time_total / 1e6, e.count,
                                 getattr(e, "self_cpu_memory_usage", 0) / 2**20) for e in avgs}
    g, r = stats["gradient"], stats["relprop"]
    diff = sorted(((r.get(k, (0, 0, 0))[0] - g.get(k, (0, 0, 0))[0], k) for k in {*g, *r}),
                  reverse=True)
    total_g = sum(v[0] for v in g.values())
    total_r = sum(v[0] for v in r.values())
    print(f"\n== self CPU time, relprop - gradient (total {total_r:.2f} s vs {total_g:.2f} s)")
    print(f"{'op':<48} {'relprop s':>10} {'calls':>7} {'gradient s':>11} {'calls':>7} {'diff s':>8}"
          + (f" {'rel MB':>9} {'grad MB':>9}" if memory else ""))
    for d, k in diff[:rows]:
        rt, rc, rm = r.get(k, (0, 0, 0))
        gt, gc, gm = g.get(k, (0, 0, 0))
        print(f"{k[:48]:<48} {rt:>10.3f} {rc:>7} {gt:>11.3f} {gc:>7} {d:>8.3f}"
              + (f" {rm:>9.0f} {gm:>9.0f}" if memory else ""))


def saved(model_key: str, seq: int, batch: int) -> None:
    """MB autograd keeps for the backward pass, by node type: gradient vs relprop."""
    import torch

    sys.path.insert(0, HERE)
    from saved_tensors import saved_by_node, show

    import relprop

    torch.set_num_threads(threads())
    model = build(model_key)
    x = make_input(model_key, seq, batch)
    if is_lm(model_key):
        e = model.get_input_embeddings()(x).detach().requires_grad_()
        show("gradient (parameters require grad)", saved_by_node(model(inputs_embeds=e).logits))
        for p in model.parameters():
            p.requires_grad_(False)
        show("gradient (parameters frozen)", saved_by_node(model(inputs_embeds=e).logits))
        for p in model.parameters():
            p.requires_grad_(True)
        inputs = (x,)
    else:
        out = model(x.clone().requires_grad_())
        show("gradient", saved_by_node(getattr(out, "logits", out)))
        inputs = (x.clone().requires_grad_(),)
    explainer = relprop.Explainer(model, "attnlrp")
    program = explainer._ensure_program(inputs, {})
    run = program.run(list(inputs))
    out = run.output
    out = getattr(out, "logits", out)
    if isinstance(out, dict):  # a traced program's ModelOutput, flattened (torch.export)
        out = out.get("logits", next(iter(out.values())))
    if not isinstance(out, torch.Tensor):
        out = out[0]
    show("relprop attnlrp", saved_by_node(out))


# ----------------------------------------------------------------------------- table

def fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}x"


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "--memory-worker":
        model, method, seq, batch = argv[1:]
        print(json.dumps(memory_worker(model, method, int(seq), int(batch))))
        return
    if argv and argv[0] == "--time-worker":
        model, seq, batch, repeats, *methods = argv[1:]
        print(json.dumps(time_worker(model, methods, int(seq), int(batch), int(repeats))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS,
                   help="llama:sdpa, llama:eager, vit_b_16 (torchvision) or hf_vit (transformers)")
    p.add_argument("--seq", type=int, default=2048, help="LLaMA tokens")
    p.add_argument("--batch", type=int, default=8, help="ViT images")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-lxt", action="store_true")
    p.add_argument("--markdown", help="append the table as a 'Transformers' section to this file")
    p.add_argument("--profile", metavar="MODEL", help="profile one relprop call vs one gradient")
    p.add_argument("--profile-memory", action="store_true")
    p.add_argument("--saved", metavar="MODEL", help="saved tensors by backward node")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    if args.profile:
        profile(args.profile, args.seq, args.batch, args.rows, args.profile_memory)
        return
    if args.saved:
        saved(args.saved, args.seq, args.batch)
        return

    me = os.path.abspath(__file__)
    child = os.path.join(HERE, "lxt_child.py")
    header = ("| model | input | method | time (s) | time x gradient | user CPU x gradient | "
              "extra peak mem (MB) | mem x gradient | targets (1.2x / 1.3x) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    print(header, flush=True)

    def emit(model: str, shape: str, method: str, t: dict, m: dict, ref_t, ref_m,
             check: bool) -> None:
        if "error" in t or "error" in m:
            line = (f"| {model} | {shape} | {method} | failed: {t.get('error') or m.get('error')}"
                    " | | | | | |")
        else:
            tr = t["time"] / ref_t["time"] if ref_t else float("nan")
            ur = t["user"] / ref_t["user"] if ref_t and ref_t["user"] else float("nan")
            mr = m["mem"] / ref_m["mem"] if ref_m and ref_m["mem"] else float("nan")
            verdict = ""
            if check:
                verdict = ("time " + ("ok" if tr <= TIME_TARGET else "MISSED") + ", memory "
                           + ("ok" if mr <= MEM_TARGET else "MISSED"))
            line = (f"| {model} | {shape} | {method} | {t['time']:.2f} | {fmt(tr)} | {fmt(ur)} | "
                    f"{m['mem'] / 2**20:.0f} | {fmt(mr)} | {verdict} |")
        print(line, flush=True)
        lines.append(line)

    for model in args.models:
        llama = is_lm(model)
        shape = f"1 x {args.seq} tokens" if llama else f"{args.batch} x 3 x 224 x 224"
        methods = ["gradient", "relprop"]
        times = run_worker([me, "--time-worker", model, str(args.seq), str(args.batch),
                            str(args.repeats), *methods])
        mems = {m: run_worker([me, "--memory-worker", model, m, str(args.seq), str(args.batch)])
                for m in methods}
        ref_t = times.get("gradient") if "error" not in times.get("gradient", times) else None
        ref_m = mems["gradient"] if "error" not in mems["gradient"] else None
        for method in methods:
            emit(model, shape, method, times.get(method, times), mems[method], ref_t, ref_m,
                 method != "gradient")
        if model.startswith("llama:") and not args.no_lxt:
            attn = model.partition(":")[2]
            lt = run_worker([child, "time", attn, str(args.seq), str(args.repeats)])
            lm = {m: run_worker([child, "memory", attn, str(args.seq), m])
                  for m in ("gradient", "lxt")}
            lref_t = lt.get("gradient") if "error" not in lt.get("gradient", lt) else None
            lref_m = lm["gradient"] if "error" not in lm["gradient"] else None
            emit(model, shape, "gradient (LXT child)", lt.get("gradient", lt), lm["gradient"],
                 lref_t, lref_m, False)
            emit(model, shape, "LXT 2.1 efficient", lt.get("lxt", lt), lm["lxt"], lref_t,
                 lref_m, True)

    if args.markdown:
        import torch
        import transformers

        with open(args.markdown, "a") as f:
            f.write("\n## Transformers (AttnLRP)\n\n")
            f.write(f"CPU, {threads()} threads (torch {torch.__version__}, transformers "
                    f"{transformers.__version__}), random weights, float32. Time: median of "
                    f"{args.repeats} interleaved rounds after a warm-up, one subprocess per "
                    "model; memory: ru_maxrss above the resident size before the call, one "
                    "subprocess per cell, after a warm-up on a small input. Ratios are to the "
                    "plain gradient x input of the same subprocess; LXT's to the unpatched "
                    "model's gradient in LXT's own child process. Issue 12's targets: time "
                    "<= 1.2x and extra memory <= 1.3x the gradient's. Command: "
                    f"`python benchmarks/bench_transformers.py {' '.join(sys.argv[1:])}`\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
