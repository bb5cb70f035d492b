"""Concurrent explanations give the sequential results and leave torch as it was.

torch.fx patches process-wide state while it traces (`nn.Module.__call__`,
`nn.Module.__getattr__`, `math` functions in module globals); torch.export
more (`builtins.max/min`, `math.pow`, backend flags). Threads here trace, run
relprop programs and run plain modules at the same time; a very short GIL
switch interval makes the bad interleavings likely within a few rounds.

torch.export also switches mkldnn/nnpack/cudnn off for the whole process while
it traces, so a convolution run in another thread meanwhile may differ in the
last bits; the export test therefore runs dense models beside the exports.
"""

from __future__ import annotations

import builtins
import math
import sys
import threading
from collections.abc import Callable, Iterator
from math import sqrt

import pytest
import torch
import torch.fx._symbolic_trace as fx_trace
import torch.nn.functional as F
from torch import nn

import relprop

ORIGINAL = {"__call__": nn.Module.__call__, "__getattr__": nn.Module.__getattr__,
            "max": builtins.max, "min": builtins.min, "pow": math.pow}
THREADS = 6
ROUNDS = 6

Case = tuple[nn.Module, torch.Tensor, dict]


class Scaled(nn.Module):
    """Calls `sqrt`: fx wraps it in this file's globals while tracing (math autowrap)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        y = F.relu(self.fc1(x)) / sqrt(self.fc1.out_features)
        return self.fc2(y)


class Blocky(nn.Module):
    """A leaf block: relprop's program calls its modules (Module.__call__) at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(self.block(y))


class Branchy(nn.Module):
    """Python control flow on a shape: fx refuses, relprop falls back to torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.fc(x))
        if x.shape[0] > 1:
            y = y * 2.0
        return self.out(y)


def _models() -> list[Case]:
    """(model, input, Explainer keywords): different architectures and code paths (fx)."""
    blocky = Blocky().eval()
    with torch.no_grad():
        blocky.bn.running_mean.normal_()
        blocky.bn.running_var.uniform_(0.5, 2)
    return [
        (Scaled().eval(), torch.randn(4, 5), {"composite": "epsilon"}),
        (Scaled(8).eval(), torch.randn(3, 5), {"composite": "epsilon_plus"}),
        (blocky, torch.randn(2, 2, 5, 5), {"composite": "epsilon_gamma_box", "low": -3.0,
                                             "high": 3.0, "leaves": {"block": "gradient"}}),
        (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).eval(), torch.randn(4, 5),
         {"composite": "epsilon", "epsilon": 0.1}),
    ]


def _explain(model: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """A fresh Explainer each time: every call traces."""
    return relprop.Explainer(model, **kw)(x, target=1).relevance


@pytest.fixture
def racy() -> Iterator[None]:
    """Switch threads every microsecond; afterwards torch must be as it was."""
    interval = sys.getswitchinterval()
    flags = _backend_flags()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
    assert nn.Module.__call__ is ORIGINAL["__call__"]
    assert nn.Module.__getattr__ is ORIGINAL["__getattr__"]
    assert (builtins.max, builtins.min, math.pow) == tuple(ORIGINAL[k] for k in ("max", "min",
                                                                                "pow"))
    assert globals()["sqrt"] is math.sqrt
    assert fx_trace.CURRENT_PATCHER is None
    assert not fx_trace._get_is_fx_tracing()
    assert _backend_flags() == flags
    x = torch.randn(1, 2)
    lin = nn.Linear(2, 2)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def _backend_flags() -> tuple[bool, bool, bool]:
    """mkldnn, nnpack, cudnn: torch.export turns them off while it traces."""
    return (torch._C._get_mkldnn_enabled(), torch._C._get_nnpack_enabled(),
            torch._C._get_cudnn_enabled())


def _run_threads(jobs: list[Callable[[], None]]) -> None:
    """Start all jobs together, each ROUNDS times; re-raise the first error any met."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def loop(job: Callable[[], None]) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                job()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _tracing(case: Case, want: torch.Tensor) -> Callable[[], None]:
    def job() -> None:
        assert torch.equal(_explain(*case), want)
    return job


def test_each_thread_traces_its_own_model(racy) -> None:
    cases = [_models()[i % 4] for i in range(THREADS)]
    cases = [(_clone(m), x, kw) for m, x, kw in cases]  # no two threads share a model
    _run_threads([_tracing(case, _explain(*case)) for case in cases])


def test_threads_trace_the_same_model(racy) -> None:
    case = _models()[2]
    mode = [m.training for m in case[0].modules()]
    _run_threads([_tracing(case, _explain(*case))] * THREADS)
    assert [m.training for m in case[0].modules()] == mode


def test_threads_share_one_explainer(racy) -> None:
    cases = _models()
    explainers = [relprop.Explainer(m, **kw) for m, _, kw in cases]
    inputs = [torch.randn(2, *x.shape[1:]) for _, x, _ in cases]
    want = [ex(x, target=1).relevance for ex, x in zip(explainers, inputs, strict=True)]

    def shared(k: int) -> Callable[[], None]:
        def job() -> None:
            assert torch.equal(explainers[k](inputs[k], target=1).relevance, want[k])
        return job

    # The shared explainers run while two threads trace the same models afresh.
    _run_threads([shared(i % len(cases)) for i in range(THREADS)] +
                 [_tracing(case, _explain(*case)) for case in cases[2:]])


def test_tracing_beside_plain_torch_code(racy) -> None:
    cases = _models()
    plain = [(m, x, m(x)) for m, x, _ in cases]
    hooked = nn.Linear(5, 2)
    calls: list[int] = []
    hooked.register_forward_hook(lambda *_: calls.append(1))
    hx = torch.randn(3, 5)
    hwant = hooked(hx)

    def running(k: int) -> Callable[[], None]:
        def job() -> None:
            m, x, y = plain[k]
            out = m(x)  # a Proxy here would mean another thread's trace reached this one
            assert type(out) is torch.Tensor and torch.equal(out, y)
            with torch.no_grad():
                assert torch.equal(m(x), y)
            assert torch.equal(hooked(hx), hwant)  # its hook fires, its output is right
        return job

    before = len(calls)
    runners = [running(i % len(plain)) for i in range(THREADS // 2 + 1)]
    _run_threads([_tracing(case, _explain(*case)) for case in cases[:THREADS // 2]] + runners)
    assert len(calls) - before == ROUNDS * len(runners)


def test_export_fallbacks_in_threads(racy) -> None:
    """torch.export (fallback) in several threads, beside fx traces and plain dense code."""
    x = torch.randn(4, 5)
    first = Branchy().eval()
    exported = [(_clone(first), x, {"composite": "epsilon"}) for _ in range(3)]
    ex = relprop.Explainer(exported[0][0], composite="epsilon")
    want = ex(x, target=1).relevance
    assert ex.program.traced.method == "export"
    dense = [_models()[0], _models()[3]]
    seq, sx, _ = dense[1]
    sy = seq(sx)

    def plain() -> None:
        assert torch.equal(seq(sx), sy)

    _run_threads([_tracing(case, want) for case in exported] +
                 [_tracing(case, _explain(*case)) for case in dense] + [plain])


def _clone(model: nn.Module) -> nn.Module:
    """The same architecture and weights in a new object."""
    twin = type(model)() if not isinstance(model, nn.Sequential) else nn.Sequential(
        *(type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else type(m)()
          for m in model))
    if isinstance(model, Scaled):
        twin = Scaled(model.fc1.out_features)
    twin.load_state_dict(model.state_dict())
    return twin.eval()
