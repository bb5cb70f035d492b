"""A slow, obviously correct LRP reference: explicit matrices, four steps per layer.

Every layer is turned into an explicit (out x in) matrix W and bias b for the
sample at hand (convolutions, transposed convolutions and average pooling by
probing with unit vectors; max pooling as the 0/1 matrix selecting each
window's winner; ReLU as the identity on relevance). Then, per layer, from the contribution matrix
Z_ij = x_i w_ij the rule's formula (the oracles' RULES.md) is evaluated term by
term: forward, divide, transpose, multiply. No autograd, no shortcuts.
Bias handling (`"bias"` in a rule: absorb, ignore, distribute) as RULES.md
defines it, with n_j the number of inputs connected to output j.

Each rule's reference is tied to the relprop rule classes it checks by
`@replicates(...)`; test_reference.py fails for a public rule without one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from relprop import LRP0, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus

EPS = 1e-6


def stab(d: np.ndarray, eps: float) -> np.ndarray:
    return d + eps * np.where(d >= 0, 1.0, -1.0)


@dataclass
class Layer:
    kind: str  # "affine" (W, b), "relu", "maxpool" (selection matrix per sample)
    W: np.ndarray | None = None
    b: np.ndarray | None = None
    proportional: bool = False  # average pooling: the proportional rule, not the composite's
    # the map with every weight 1 and no bias (what flat and bias distribution count);
    # None: W != 0
    conn: np.ndarray | None = None


def affine_from(fn, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Probe a linear map with unit vectors to get its explicit matrix and bias."""
    n = int(np.prod(in_shape))
    with torch.no_grad():
        b = fn(torch.zeros(1, *in_shape, dtype=torch.float64)).reshape(-1).numpy()
        eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        cols = fn(eye).reshape(n, -1).numpy() - b[None]
    return cols.T.copy(), b


# Rule class -> its reference; rule name (the classes' `name`, "lrp0") -> reference.
REFERENCES: dict[type[Rule], Callable[[dict, Dense], np.ndarray]] = {}
_BY_NAME: dict[str, Callable[[dict, Dense], np.ndarray]] = {}


def replicates(*rules: type[Rule], aliases: tuple[str, ...] = ()):
    """Tie a reference to the rule classes it checks (after Zennit's rule tests): a
    public rule without one fails test_reference.py. Rules given as dicts find their
    reference by the classes' `name` (or an alias)."""
    def tie(fn):
        for cls in rules:
            REFERENCES[cls] = fn
            _BY_NAME.setdefault(cls.name, fn)
        for alias in aliases:
            _BY_NAME[alias] = fn
        fn.replicates = rules
        return fn
    return tie


@dataclass
class Dense:
    """One dense layer z = W x + b for one sample, with the relevance R at z.

    `conn` is the layer with every weight 1 and no bias (default: W != 0); its
    column sums n_j count the inputs each output is connected to.
    """

    x: np.ndarray
    W: np.ndarray
    b: np.ndarray
    R: np.ndarray
    conn: np.ndarray | None
    mode: str  # bias handling: absorb, ignore, distribute

    @property
    def keep(self) -> bool:
        """The bias stays in the denominators."""
        return self.mode != "ignore"

    @property
    def Wt(self) -> np.ndarray:  # noqa: N802
        """(in, out): w_ij with i input, j output."""
        return self.W.T

    @property
    def C(self) -> np.ndarray:  # noqa: N802
        return ((self.W != 0) if self.conn is None else self.conn).T.astype(float)

    def shares(self, v: np.ndarray) -> np.ndarray | float:
        """distribute: output j's bias relevance v_j, b_j / n_j to each connected input."""
        if self.mode != "distribute":
            return 0.0
        C = self.C
        n = C.sum(0)
        return (C * (v / np.where(n == 0, 1.0, n))[None]).sum(1)


def as_dict(rule: dict | Rule) -> dict:
    """A rule given as a relprop rule object, as the reference's dict of parameters."""
    if isinstance(rule, dict):
        return rule
    return {"name": type(rule).name, **{f.name: getattr(rule, f.name) for f in fields(rule)}}


def reference_for(rule: dict | Rule) -> Callable[[dict, Dense], np.ndarray]:
    if isinstance(rule, dict):
        return _BY_NAME[rule["name"]]
    return REFERENCES[type(rule)]


def rule_relevance(rule: dict | Rule, x: np.ndarray, W: np.ndarray, b: np.ndarray,
                   R: np.ndarray, conn: np.ndarray | None = None) -> np.ndarray:
    """Input relevance of one dense layer z = W x + b for one sample, term by term.

    `rule`: a relprop rule object, or a dict {"name": ..., parameters} ("lrp0":
    epsilon without stabilizer). `conn`: see `Dense`.
    """
    params = as_dict(rule)
    layer = Dense(x, W, b, R, conn, params.get("bias", "absorb"))
    return reference_for(rule)(params, layer)


@replicates(Epsilon, LRP0, aliases=("lrp0",))
def epsilon_reference(rule: dict, d: Dense) -> np.ndarray:
    """Z_ij = x_i w_ij, R_i = sum_j Z_ij R_j / stab(z_j) (epsilon 0: no stabilizer)."""
    eps = 0.0 if rule["name"] == "lrp0" else rule.get("epsilon", EPS)
    Z = d.x[:, None] * d.Wt
    z = Z.sum(0) + d.b
    D = z if d.keep else z - d.b
    s = d.R / (np.where(D == 0, 1.0, D) if eps == 0 else stab(D, eps))
    return (Z * s[None]).sum(1) + d.shares(d.b * s)


@replicates(AlphaBeta, ZPlus)
def alpha_beta_reference(rule: dict, d: Dense) -> np.ndarray:
    """alpha sum_j Z+_ij R_j / stab(P_j) - beta sum_j Z-_ij R_j / stab(N_j)."""
    a, be = rule["alpha"], rule["beta"]
    eps = rule.get("epsilon", EPS)
    x, Wt, b = d.x, d.Wt, d.b
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    wp, wn = np.maximum(Wt, 0), np.minimum(Wt, 0)
    bp, bn = np.maximum(b, 0), np.minimum(b, 0)
    Zp = xp[:, None] * wp + xn[:, None] * wn
    Zn = xp[:, None] * wn + xn[:, None] * wp
    P = Zp.sum(0) + (bp if d.keep else 0.0)
    N = Zn.sum(0) + (bn if d.keep else 0.0)
    sp, sn = d.R / stab(P, eps), d.R / stab(N, eps)
    return a * (Zp * sp[None]).sum(1) - be * (Zn * sn[None]).sum(1) + \
        d.shares(a * bp * sp - be * bn * sn)


@replicates(Gamma)
def gamma_reference(rule: dict, d: Dense) -> np.ndarray:
    """Generalised gamma: contributions with the output's sign weighted (1 + gamma)."""
    g = rule["gamma"]
    eps = rule.get("epsilon", EPS)
    x, Wt, b = d.x, d.Wt, d.b
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    wp, wn = np.maximum(Wt, 0), np.minimum(Wt, 0)
    bp, bn = np.maximum(b, 0), np.minimum(b, 0)
    z = (x[:, None] * Wt).sum(0) + b
    Zp = xp[:, None] * (Wt + g * wp) + xn[:, None] * (Wt + g * wn)
    Zn = xp[:, None] * (Wt + g * wn) + xn[:, None] * (Wt + g * wp)
    P = Zp.sum(0) + ((b + g * bp) if d.keep else 0.0)
    N = Zn.sum(0) + ((b + g * bn) if d.keep else 0.0)
    sp = np.where(z > 0, d.R, 0.0) / stab(P, eps)
    sn = np.where(z < 0, d.R, 0.0) / stab(N, eps)
    return (Zp * sp[None]).sum(1) + (Zn * sn[None]).sum(1) + \
        d.shares((b + g * bp) * sp + (b + g * bn) * sn)


@replicates(Flat)
def flat_reference(rule: dict, d: Dense) -> np.ndarray:
    """Every weight 1, no bias: spread over the connected inputs."""
    C = d.C
    return (C / stab(C.sum(0), rule.get("epsilon", EPS))[None] * d.R[None]).sum(1)


@replicates(WSquare)
def wsquare_reference(rule: dict, d: Dense) -> np.ndarray:
    """R_i = sum_j w_ij^2 R_j / stab(sum_i' w_i'j^2 (+ b_j^2))."""
    W2 = d.Wt**2
    s = d.R / stab(W2.sum(0) + (d.b**2 if d.keep else 0.0), rule.get("epsilon", EPS))
    return (W2 * s[None]).sum(1) + d.shares(d.b**2 * s)


@replicates(ZBox)
def zbox_reference(rule: dict, d: Dense) -> np.ndarray:
    """Z_ij = x_i w_ij - low_i w+_ij - high_i w-_ij, R_i = sum_j Z_ij R_j / stab(z_j)."""
    x, Wt = d.x, d.Wt
    lo = np.broadcast_to(rule["low"], x.shape)
    hi = np.broadcast_to(rule["high"], x.shape)
    Z = x[:, None] * Wt - lo[:, None] * np.maximum(Wt, 0) - hi[:, None] * np.minimum(Wt, 0)
    return (Z / stab(Z.sum(0), rule.get("epsilon", EPS))[None] * d.R[None]).sum(1)


def propagate(layers_fn, x: np.ndarray, target: int, rules: list[dict],
              sum_eps: float = EPS) -> np.ndarray:
    """Reference relevance of one sample: `layers_fn(x)` gives the explicit layers."""
    layers = layers_fn(x)
    acts = [x.reshape(-1)]
    for layer in layers:  # forward
        a = acts[-1]
        if layer.kind == "relu":
            acts.append(np.maximum(a, 0))
        else:
            acts.append(layer.W @ a + layer.b)
    R = np.zeros_like(acts[-1])
    R[target] = acts[-1][target]
    rule_iter = iter(rules)
    weighted = [i for i, lay in enumerate(layers) if lay.kind == "affine" and
                not lay.proportional]
    assigned = {i: next(rule_iter) for i in weighted}
    for i in reversed(range(len(layers))):  # divide, transpose, multiply
        layer, a = layers[i], acts[i]
        if layer.kind == "relu":
            continue  # identity rule
        if layer.proportional:
            rule = {"name": "epsilon", "epsilon": sum_eps} if sum_eps else {"name": "lrp0"}
        elif layer.kind == "maxpool":
            rule = {"name": "lrp0"}  # winner takes all: W selects the winners
        else:
            rule = assigned[i]
        R = rule_relevance(rule, a, layer.W, layer.b, R, layer.conn)
    return R


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_transpose_layer(module: torch.nn.Module, in_shape: tuple[int, ...],
                         after=None) -> Layer:
    """A ConvTranspose{1,2,3}d as an explicit matrix, probed through F.conv_transpose
    with the module's settings; `after` (a BatchNorm, say) is applied to its output.
    `conn` probes the same map with every weight 1 and no bias."""
    fn = _CONV_T[len(in_shape) - 1]
    m = module
    w = m.weight.detach().double()
    b = None if m.bias is None else m.bias.detach().double()

    def apply(weight, bias, then=None):
        def run(v):
            z = fn(v, weight, bias, m.stride, m.padding, m.output_padding, m.groups,
                   m.dilation)
            return z if then is None else then(z)
        return run

    W, bias = affine_from(apply(w, b, after), in_shape)
    conn, _ = affine_from(apply(torch.ones_like(w), None), in_shape)
    return Layer("affine", W, bias, conn=conn)


def maxpool_layer(x_chw: torch.Tensor, k: int) -> Layer:
    """The 0/1 matrix that picks each window's maximum (for this sample)."""
    _, idx = F.max_pool2d(x_chw[None], k, return_indices=True)
    c, h, w = x_chw.shape
    out = idx.reshape(-1).numpy()
    ch = np.repeat(np.arange(c), out.size // c)
    W = np.zeros((out.size, c * h * w))
    W[np.arange(out.size), ch * h * w + out] = 1.0
    return Layer("maxpool", W, np.zeros(out.size))


@dataclass
class Node:
    """One node of a DAG for the reference: op in input / affine / relu / add / maxpool."""

    op: str
    src: tuple[int, ...] = ()
    W: np.ndarray | None = None
    b: np.ndarray | None = None
    rule: dict | None = None


def propagate_dag(nodes: list[Node], x: np.ndarray, target: int,
                  sum_eps: float = EPS) -> np.ndarray:
    """Reference LRP on a DAG (residual adds, reused layers): nodes in forward order,
    relevance of a node is the sum of what its consumers hand it."""
    vals: list[np.ndarray] = []
    for n in nodes:
        if n.op == "input":
            vals.append(x.reshape(-1))
        elif n.op == "relu":
            vals.append(np.maximum(vals[n.src[0]], 0))
        elif n.op == "add":
            vals.append(vals[n.src[0]] + vals[n.src[1]])
        else:  # affine, maxpool (selection matrix)
            vals.append(n.W @ vals[n.src[0]] + n.b)
    R = [np.zeros_like(v) for v in vals]
    R[-1][target] = vals[-1][target]
    for i in reversed(range(len(nodes))):
        n = nodes[i]
        if n.op == "input":
            continue
        if n.op == "relu":
            R[n.src[0]] += R[i]  # identity rule
        elif n.op == "add":
            z = vals[i]
            den = stab(z, sum_eps) if sum_eps else np.where(z == 0, 1.0, z)
            for s in n.src:
                R[s] += vals[s] / den * R[i]
        elif n.op == "maxpool":
            R[n.src[0]] += rule_relevance({"name": "lrp0"}, vals[n.src[0]], n.W, n.b, R[i])
        else:
            R[n.src[0]] += rule_relevance(n.rule, vals[n.src[0]], n.W, n.b, R[i])
    return R[0]
