"""The LRP rules for linear-like layers, in gradient form: one class per rule,
owning all of its forms (general backward, fused form, weight modifiers).

Formulas are those of ../shared/RULES.md (Zennit's and iNNvestigate's
definitions); notation: x+ = max(x, 0), w- = min(w, 0). Each rule's class
docstring states it; `Rule` (relprop.rules.base) states the bias modes and
what a rule provides.

    base.py        Rule, BoundLayer, Incoming, Propagated, Tally, stabilizer, validation
    epsilon.py     Epsilon, LRP0
    gamma.py       Gamma
    alpha_beta.py  AlphaBeta, ZPlus
    flat.py        Flat
    wsquare.py     WSquare
    zbox.py        ZBox
    attention.py   AttnLRP, CPLRP: softmax, bilinear products, attention; cosine similarity
"""

from ..layers import Modifier
from .alpha_beta import AlphaBeta, ZPlus
from .attention import CPLRP, AttentionRule, AttnLRP, cosine_similarity, scaled
from .base import (
    BIAS_MODES,
    EPSILON_WHY,
    RELU,
    TINY,
    Activation,
    BoundLayer,
    Incoming,
    Propagated,
    Rule,
    Tally,
    check_nonnegative,
    is_number,
    keep_top_k,
    safe_divide,
    stabilize,
)
from .epsilon import LRP0, Epsilon
from .flat import Flat
from .gamma import Gamma
from .wsquare import WSquare
from .zbox import ZBox, check_bounds

__all__ = [
    "BIAS_MODES", "EPSILON_WHY", "RELU", "TINY", "Activation", "BoundLayer", "Incoming",
    "Modifier", "Propagated", "Rule", "Tally", "check_bounds", "check_nonnegative", "is_number",
    "keep_top_k", "safe_divide", "stabilize",
    "AttentionRule", "AttnLRP", "CPLRP", "cosine_similarity", "scaled",
    "LRP0", "AlphaBeta", "Epsilon", "Flat", "Gamma", "WSquare", "ZBox", "ZPlus",
]
