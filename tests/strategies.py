"""Hypothesis strategies: random tiny models, each in two forms.

`model_specs()` draws a `ModelSpec`: an MLP or a 1-d / 2-d CNN made of blocks
(dense/conv layers with or without bias and BatchNorm, residual adds,
concatenation, a layer used twice, max / average / adaptive pooling, a lone
BatchNorm, activations, dropout, flatten / view / reshape) plus a seed for its
parameters and inputs. `spec.build("module")` gives the model as a composition
of modules (nn.Sequential, nn.Conv2d, nn.ReLU, nn.Flatten, ... with two small
containers for `x + f(x)` and `torch.cat`), `spec.build("functional")` the
same function written as functional code in one `forward` (F.conv2d,
torch.relu, x.relu(), x + y, torch.add, torch.flatten, x.view(x.size(0), -1),
...). Both hold identical float64 parameters; BatchNorm has random running
statistics, weight and bias. `spec.code()` prints the functional forward, so
that a falsifying example reads as a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "silu", "gelu")
PIECEWISE_LINEAR = ("relu", "leaky_relu")
LEAKY_SLOPE = 0.1
BLOCK_KINDS = ("dense", "residual", "concat", "twice", "pool", "norm", "act", "dropout")

# ------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class Dense:
    """Linear (dense stage) or Conv (conv stage, 'same' padding), then BatchNorm, then act."""

    out: int
    kernel: int = 1
    bias: bool = True
    bn: bool = False
    act: str | None = None


@dataclass(frozen=True)
class Residual:
    """x + act(bn(layer(x))), then post (an activation or None)."""

    kernel: int = 1
    bias: bool = True
    bn: bool = False
    act: str | None = None
    post: str | None = None


@dataclass(frozen=True)
class Concat:
    """torch.cat([a(x), b(x)], 1); b = None: torch.cat([a(x), x], 1)."""

    a: Dense
    b: Dense | None = None


@dataclass(frozen=True)
class Twice:
    """One layer (one module, one set of parameters) used twice: act(L(act(L(x))))."""

    kernel: int = 1
    bias: bool = True
    act: str | None = "relu"


@dataclass(frozen=True)
class Pool:
    """Max or average pooling: window 2 stride 2, or window 3 stride 1 padding 1."""

    kind: str = "max"
    window: int = 2


@dataclass(frozen=True)
class Norm:
    """A BatchNorm that follows no layer (an affine map of its own)."""


@dataclass(frozen=True)
class Act:
    name: str = "relu"


@dataclass(frozen=True)
class Dropout:
    p: float = 0.5


@dataclass(frozen=True)
class Flatten:
    """Conv -> dense: optional adaptive pooling ('avg'/'max', output size), then flatten."""

    adaptive: tuple[str, int] | None = None


Block = Dense | Residual | Concat | Twice | Pool | Norm | Act | Dropout


@dataclass(frozen=True)
class ModelSpec:
    dims: int  # 0: MLP on (B, features); 1: (B, C, L); 2: (B, C, H, W)
    in_channels: int  # features for an MLP
    size: int  # spatial side (conv nets)
    batch: int
    conv: tuple[Block, ...]
    flatten: Flatten | None
    dense: tuple[Block, ...]
    n_out: int
    head_bias: bool
    bias_free: bool  # no additive term anywhere (BatchNorm: running mean 0, bias 0)
    seed: int
    x_scale: float = 1.0
    zero_inputs: bool = False  # about a third of the input entries exactly 0
    style: int = 0  # picks among equivalent functional spellings
    notes: tuple[str, ...] = field(default=(), compare=False)

    # -------------------------------------------------------------- inputs

    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_channels, *(self.size,) * self.dims)

    def make_input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.input_shape(), generator=g, dtype=torch.float64) * self.x_scale
        if self.zero_inputs:
            x = torch.where(torch.rand(x.shape, generator=g, dtype=torch.float64) < 1 / 3,
                            0.0, x)
        return x

    def bounds(self, x: torch.Tensor) -> tuple[float, float]:
        """z-box bounds that contain the input."""
        return float(x.min()) - 0.5, float(x.max()) + 0.5

    # -------------------------------------------------------------- models

    def build(self, form: str) -> nn.Module:
        """The model in `form` ("module" or "functional"), float64, eval mode."""
        modules = _ModuleBuilder(self).build()
        _init_parameters(modules, self)
        modules = modules.double().eval()
        if form == "module":
            return modules
        if form != "functional":
            raise ValueError(form)
        fun = FunctionalNet(self, modules).double().eval()
        return fun

    def code(self) -> str:
        """The functional form's forward as Python-like source (for reports)."""
        return "\n".join(_Printer(self).lines())


# ------------------------------------------------------------------ module form


def _act_modules(name: str | None) -> list[nn.Module]:
    """The activation as a module; none at all for None (an nn.Identity would be a node of
    its own, which the functional form does not have)."""
    return [] if name is None else [_act_module(name)]


def _act_module(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
        "silu": nn.SiLU, "gelu": nn.GELU,
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    }[name]()


class Residual2(nn.Module):
    """x + body(x), then post (a module, or nothing)."""

    def __init__(self, body: nn.Module, post: nn.Module | None) -> None:
        super().__init__()
        self.body, self.post = body, post

    def forward(self, x):
        y = x + self.body(x)
        return y if self.post is None else self.post(y)


class Cat(nn.Module):
    """torch.cat([a(x), b(x)], 1); b None: torch.cat([a(x), x], 1)."""

    def __init__(self, a: nn.Module, b: nn.Module | None) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), x if self.b is None else self.b(x)], 1)


class _ModuleBuilder:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def layer(self, dense: bool, c_in: int, c_out: int, kernel: int, bias: bool) -> nn.Module:
        if dense:
            return nn.Linear(c_in, c_out, bias=bias)
        conv = nn.Conv1d if self.spec.dims == 1 else nn.Conv2d
        return conv(c_in, c_out, kernel, padding=kernel // 2, bias=bias)

    def bn(self, dense: bool, c: int) -> nn.Module:
        return nn.BatchNorm1d(c) if dense or self.spec.dims == 1 else nn.BatchNorm2d(c)

    def dense_block(self, b: Dense, dense: bool, c: int) -> nn.Sequential:
        parts = [self.layer(dense, c, b.out, b.kernel, b.bias)]
        if b.bn:
            parts.append(self.bn(dense, b.out))
        parts += _act_modules(b.act)
        return nn.Sequential(*parts)

    def block(self, b: Block, dense: bool, c: int) -> tuple[nn.Module, int]:
        d = self.spec.dims
        if isinstance(b, Dense):
            return self.dense_block(b, dense, c), b.out
        if isinstance(b, Residual):
            body = self.dense_block(Dense(c, b.kernel, b.bias, b.bn, b.act), dense, c)
            return Residual2(body, None if b.post is None else _act_module(b.post)), c
        if isinstance(b, Concat):
            a = self.dense_block(b.a, dense, c)
            other = None if b.b is None else self.dense_block(b.b, dense, c)
            return Cat(a, other), b.a.out + (c if b.b is None else b.b.out)
        if isinstance(b, Twice):
            lay = self.layer(dense, c, c, b.kernel, b.bias)
            return nn.Sequential(lay, *_act_modules(b.act), lay, *_act_modules(b.act)), c
        if isinstance(b, Pool):
            if b.kind == "max":
                cls = nn.MaxPool1d if d == 1 else nn.MaxPool2d
            else:
                cls = nn.AvgPool1d if d == 1 else nn.AvgPool2d
            return (cls(2) if b.window == 2 else cls(3, 1, 1)), c
        if isinstance(b, Norm):
            return self.bn(dense, c), c
        if isinstance(b, Act):
            return _act_module(b.name), c
        if isinstance(b, Dropout):
            return nn.Dropout(b.p), c
        raise TypeError(b)

    def build(self) -> nn.Sequential:
        s = self.spec
        mods: list[nn.Module] = []
        c = s.in_channels
        for b in s.conv:
            m, c = self.block(b, False, c)
            mods.append(m)
        if s.dims:
            flat = s.flatten or Flatten()
            side = _side_after(s)
            if flat.adaptive is not None:
                kind, size = flat.adaptive
                cls = {("avg", 1): nn.AdaptiveAvgPool1d, ("avg", 2): nn.AdaptiveAvgPool2d,
                       ("max", 1): nn.AdaptiveMaxPool1d, ("max", 2): nn.AdaptiveMaxPool2d}
                mods.append(cls[(kind, s.dims)](size))
                side = size
            mods.append(nn.Flatten())
            c = c * side ** s.dims
        for b in s.dense:
            m, c = self.block(b, True, c)
            mods.append(m)
        mods.append(nn.Linear(c, s.n_out, bias=s.head_bias))
        return nn.Sequential(*mods)


def _side_after(s: ModelSpec) -> int:
    side = s.size
    for b in s.conv:
        if isinstance(b, Pool) and b.window == 2:
            side //= 2
    return side


def _init_parameters(model: nn.Module, spec: ModelSpec) -> None:
    """Random weights (pre-activations O(1)), biases, BatchNorm statistics from spec.seed."""
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 1.5 / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_var.copy_(torch.rand(n, generator=g) * 1.75 + 0.25)
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1.0)
                mean = torch.randn(n, generator=g) * 0.5
                beta = torch.randn(n, generator=g) * 0.5
                if spec.bias_free:
                    mean.zero_()
                    beta.zero_()
                m.running_mean.copy_(mean)
                m.bias.copy_(beta)


# ------------------------------------------------------------------ functional form


class FunctionalNet(nn.Module):
    """The spec's model as functional code in one forward; parameters copied from `source`
    (the module form), taken in the same order as the module form creates them."""

    def __init__(self, spec: ModelSpec, source: nn.Sequential) -> None:
        super().__init__()
        self.spec = spec
        self._n = 0
        self._source = [m for m in source.modules()
                        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d
                                      | nn.modules.batchnorm._BatchNorm)]
        self._taken: dict[int, str] = {}
        self.plan = _Planner(self).plan()
        del self._source, self._taken

    # parameters, registered while planning
    def take(self, kind: str) -> str:
        """Copy the next source layer's parameters (a reused module: the same names)."""
        src = self._source.pop(0)
        if id(src) in self._taken:
            return self._taken[id(src)]
        name = f"{kind}{self._n}"
        self._n += 1
        if isinstance(src, nn.modules.batchnorm._BatchNorm):
            self.register_parameter(f"{name}_w", nn.Parameter(src.weight.detach().clone()))
            self.register_parameter(f"{name}_b", nn.Parameter(src.bias.detach().clone()))
            self.register_buffer(f"{name}_mean", src.running_mean.detach().clone())
            self.register_buffer(f"{name}_var", src.running_var.detach().clone())
        else:
            self.register_parameter(f"{name}_w", nn.Parameter(src.weight.detach().clone()))
            b = None if src.bias is None else nn.Parameter(src.bias.detach().clone())
            self.register_parameter(f"{name}_b", b)
        self._taken[id(src)] = name
        return name

    def forward(self, x):
        for step in self.plan:
            x = self._run(step, x)
        return x

    def _run(self, step: tuple, x):
        op = step[0]
        if op == "layer":
            _, name, conv, k = step
            w, b = getattr(self, f"{name}_w"), getattr(self, f"{name}_b")
            if conv == 0:
                return F.linear(x, w, b)
            fn = F.conv1d if conv == 1 else F.conv2d
            return fn(x, w, b, padding=k // 2)
        if op == "bn":
            name = step[1]
            return F.batch_norm(x, getattr(self, f"{name}_mean"), getattr(self, f"{name}_var"),
                                getattr(self, f"{name}_w"), getattr(self, f"{name}_b"),
                                self.training, 0.1, 1e-5)
        if op == "act":
            return _functional_act(step[1], x, step[2])
        if op == "seq":
            for s in step[1]:
                x = self._run(s, x)
            return x
        if op == "residual":
            _, body, post, style = step
            y = self._run(body, x)
            z = x + y if style % 2 == 0 else torch.add(x, y)
            return self._run(post, z)
        if op == "cat":
            _, a, b, style = step
            ya = self._run(a, x)
            yb = x if b is None else self._run(b, x)
            return torch.cat([ya, yb], 1) if style % 2 == 0 else torch.cat((ya, yb), dim=1)
        if op == "pool":
            _, kind, window, dims = step
            fn = {("max", 1): F.max_pool1d, ("max", 2): F.max_pool2d,
                  ("avg", 1): F.avg_pool1d, ("avg", 2): F.avg_pool2d}[(kind, dims)]
            return fn(x, 2) if window == 2 else fn(x, 3, 1, 1)
        if op == "adaptive":
            _, kind, size, dims = step
            fn = {("max", 1): F.adaptive_max_pool1d, ("max", 2): F.adaptive_max_pool2d,
                  ("avg", 1): F.adaptive_avg_pool1d, ("avg", 2): F.adaptive_avg_pool2d}
            return fn[(kind, dims)](x, size)
        if op == "flatten":
            style = step[1] % 4
            if style == 0:
                return torch.flatten(x, 1)
            if style == 1:
                return x.view(x.size(0), -1)
            if style == 2:
                return x.reshape(x.shape[0], -1)
            return x.flatten(1)
        if op == "dropout":
            return F.dropout(x, step[1], self.training)
        raise ValueError(op)


def _functional_act(name: str | None, x, style: int):
    if name is None:
        return x
    if name == "relu":
        return (torch.relu(x), F.relu(x), x.relu())[style % 3]
    if name == "leaky_relu":
        return F.leaky_relu(x, LEAKY_SLOPE)
    if name == "tanh":
        return torch.tanh(x) if style % 2 == 0 else x.tanh()
    if name == "sigmoid":
        return torch.sigmoid(x) if style % 2 == 0 else x.sigmoid()
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(name)


class _Planner:
    """Turns the spec into FunctionalNet steps, taking parameters in module order."""

    def __init__(self, net: FunctionalNet) -> None:
        self.net = net
        self.spec = net.spec
        self.count = 0

    def style(self) -> int:
        self.count += 1
        return self.spec.style + self.count

    def act(self, name: str | None) -> tuple:
        return ("act", name, self.style())

    def dense(self, b: Dense, conv: int) -> tuple:
        steps = [("layer", self.net.take("fc" if conv == 0 else "conv"), conv, b.kernel)]
        if b.bn:
            steps.append(("bn", self.net.take("bn")))
        steps.append(self.act(b.act))
        return ("seq", tuple(steps))

    def block(self, b: Block, conv: int) -> tuple:
        d = self.spec.dims
        if isinstance(b, Dense):
            return self.dense(b, conv)
        if isinstance(b, Residual):
            body = self.dense(Dense(0, b.kernel, b.bias, b.bn, b.act), conv)
            return ("residual", body, self.act(b.post), self.style())
        if isinstance(b, Concat):
            a = self.dense(b.a, conv)
            other = None if b.b is None else self.dense(b.b, conv)
            return ("cat", a, other, self.style())
        if isinstance(b, Twice):
            name = self.net.take("fc" if conv == 0 else "conv")  # modules() lists it once
            lay = ("layer", name, conv, b.kernel)
            return ("seq", (lay, self.act(b.act), lay, self.act(b.act)))
        if isinstance(b, Pool):
            return ("pool", b.kind, b.window, d)
        if isinstance(b, Norm):
            return ("bn", self.net.take("bn"))
        if isinstance(b, Act):
            return self.act(b.name)
        if isinstance(b, Dropout):
            return ("dropout", b.p)
        raise TypeError(b)

    def plan(self) -> list[tuple]:
        s = self.spec
        steps = [self.block(b, s.dims) for b in s.conv]
        if s.dims:
            flat = s.flatten or Flatten()
            if flat.adaptive is not None:
                steps.append(("adaptive", *flat.adaptive, s.dims))
            steps.append(("flatten", self.style()))
        steps += [self.block(b, 0) for b in s.dense]
        steps.append(("layer", self.net.take("fc"), 0, 1))
        return steps


class _Printer:
    """The functional forward as source text."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.net = FunctionalNet(spec, _ModuleBuilder(spec).build())
        self.n = 0

    def var(self) -> str:
        self.n += 1
        return f"h{self.n}"

    def emit(self, step: tuple, x: str, out: list[str]) -> str:
        op = step[0]
        if op == "layer":
            _, name, conv, k = step
            w, b = f"self.{name}_w", getattr(self.net, f"{name}_b")
            b = "None" if b is None else f"self.{name}_b"
            expr = (f"F.linear({x}, {w}, {b})" if conv == 0 else
                    f"F.conv{conv}d({x}, {w}, {b}, padding={k // 2})")
        elif op == "bn":
            n = step[1]
            expr = (f"F.batch_norm({x}, self.{n}_mean, self.{n}_var, self.{n}_w, self.{n}_b, "
                    "self.training, 0.1, 1e-5)")
        elif op == "act":
            name, style = step[1], step[2]
            if name is None:
                return x
            spellings = {"relu": ("torch.relu({x})", "F.relu({x})", "{x}.relu()"),
                         "leaky_relu": (f"F.leaky_relu({{x}}, {LEAKY_SLOPE})",),
                         "tanh": ("torch.tanh({x})", "{x}.tanh()"),
                         "sigmoid": ("torch.sigmoid({x})", "{x}.sigmoid()"),
                         "silu": ("F.silu({x})",), "gelu": ("F.gelu({x})",)}[name]
            expr = spellings[style % len(spellings)].format(x=x)
        elif op == "seq":
            for s in step[1]:
                x = self.emit(s, x, out)
            return x
        elif op == "residual":
            y = self.emit(step[1], x, out)
            z = self.var()
            out.append(f"{z} = {x} + {y}" if step[3] % 2 == 0 else f"{z} = torch.add({x}, {y})")
            return self.emit(step[2], z, out)
        elif op == "cat":
            ya = self.emit(step[1], x, out)
            yb = x if step[2] is None else self.emit(step[2], x, out)
            expr = (f"torch.cat([{ya}, {yb}], 1)" if step[3] % 2 == 0 else
                    f"torch.cat(({ya}, {yb}), dim=1)")
        elif op == "pool":
            _, kind, window, dims = step
            args = "2" if window == 2 else "3, 1, 1"
            expr = f"F.{kind}_pool{dims}d({x}, {args})"
        elif op == "adaptive":
            _, kind, size, dims = step
            expr = f"F.adaptive_{kind}_pool{dims}d({x}, {size})"
        elif op == "flatten":
            expr = ("torch.flatten({x}, 1)", "{x}.view({x}.size(0), -1)",
                    "{x}.reshape({x}.shape[0], -1)", "{x}.flatten(1)")[step[1] % 4].format(x=x)
        elif op == "dropout":
            expr = f"F.dropout({x}, {step[1]}, self.training)"
        else:
            raise ValueError(op)
        v = self.var()
        out.append(f"{v} = {expr}")
        return v

    def lines(self) -> list[str]:
        s = self.spec
        out: list[str] = []
        x = "x"
        for step in self.net.plan:
            x = self.emit(step, x, out)
        head = [f"# x: {tuple(s.input_shape())} float64, seed {s.seed}"
                f"{', a third of the entries 0' if s.zero_inputs else ''}, "
                f"bias_free={s.bias_free}"]
        return head + out + [f"return {x}"]


# ------------------------------------------------------------------ strategies


def _act(draw, acts: tuple[str, ...], optional: bool = True) -> str | None:
    choices: list[str | None] = list(acts)
    if optional:
        choices = [None, *choices]
    return draw(st.sampled_from(choices))


@st.composite
def model_specs(draw, dims: tuple[int, ...] = (0, 1, 2),
                acts: tuple[str, ...] = ACTIVATIONS,
                bias: str = "random",
                blocks: tuple[str, ...] = BLOCK_KINDS,
                max_blocks: int = 3, zero_inputs: bool | None = None) -> ModelSpec:
    """A random tiny model. bias: "random" (each layer on or off), "none" (bias-free:
    no layer biases, BatchNorm with running mean 0 and bias 0), "all" (every layer).
    zero_inputs: whether about a third of the input entries are exactly 0 (None: either)."""
    d = draw(st.sampled_from(dims))

    def has_bias() -> bool:
        if bias == "random":
            return draw(st.booleans())
        return bias == "all"

    def draw_dense(dense: bool, max_out: int) -> Dense:
        return Dense(out=draw(st.integers(1, max_out)),
                     kernel=1 if dense else draw(st.sampled_from((1, 3))),
                     bias=has_bias(), bn=draw(st.booleans()), act=_act(draw, acts))

    def stage(dense: bool, c: int, side: int, max_c: int) -> tuple[list[Block], int, int]:
        kinds = [k for k in blocks if not (k == "pool" and dense)]
        out: list[Block] = []
        for _ in range(draw(st.integers(0, max_blocks))):
            kind = draw(st.sampled_from(kinds))
            if kind == "pool" and side < 2:
                kind = "dense"
            if kind == "concat" and c >= max_c:
                kind = "dense"
            k = 1 if dense else draw(st.sampled_from((1, 3)))
            if kind == "dense":
                b: Block = draw_dense(dense, max_c)
                c = b.out
            elif kind == "residual":
                b = Residual(k, has_bias(), draw(st.booleans()), _act(draw, acts),
                             _act(draw, acts))
            elif kind == "concat":
                a = draw_dense(dense, max(1, max_c - c))
                other = draw_dense(dense, 2) if draw(st.booleans()) else None
                b = Concat(a, other)
                c = a.out + (c if other is None else other.out)
            elif kind == "twice":
                b = Twice(k, has_bias(), _act(draw, acts))
            elif kind == "pool":
                window = draw(st.sampled_from((2, 3)))
                b = Pool(draw(st.sampled_from(("max", "avg"))), window)
                if window == 2:
                    side //= 2
            elif kind == "norm":
                b = Norm()
            elif kind == "act":
                b = Act(_act(draw, acts, optional=False))
            else:
                b = Dropout(0.5)
            out.append(b)
        return out, c, side

    c0 = draw(st.integers(1, 3)) if d else draw(st.integers(2, 6))
    size = 8 if d else 0
    conv: list[Block] = []
    flat = None
    c = c0
    if d:
        conv, c, side = stage(False, c0, size, 6)
        adaptive = draw(st.sampled_from((None, "avg", "max")))
        flat = Flatten(None if adaptive is None else
                       (adaptive, draw(st.integers(1, min(2, side)))))
    dense, c, _ = stage(True, c, 0, 6)
    return ModelSpec(
        dims=d, in_channels=c0, size=size, batch=draw(st.integers(2, 3)),
        conv=tuple(conv), flatten=flat, dense=tuple(dense), n_out=draw(st.integers(2, 4)),
        head_bias=has_bias(), bias_free=bias == "none",
        seed=draw(st.integers(0, 2**16)),
        x_scale=draw(st.sampled_from((1.0, 3.0))),
        zero_inputs=draw(st.booleans()) if zero_inputs is None else zero_inputs,
        style=draw(st.integers(0, 5)),
    )
