"""The LRP rules, one family per module, each owning all of its forms (general
backward, fused form, weight modifiers) or its autograd Function.

Formulas are those of ../shared/RULES.md (Zennit's and iNNvestigate's
definitions); notation: x+ = max(x, 0), w- = min(w, 0). Each rule's class
docstring states it; `Rule` (relprop.rules.base) states the bias modes and
what a rule provides.

    base.py         the contract: RuleBase (bias modes, validation), Rule (linear-like
                    layers), BoundLayer, Incoming, Propagated, Tally, the stabilizer;
                    LayerRuleFunction and FusedLayer, which run a Rule's forms
    epsilon.py      Epsilon, LRP0
    signsplit.py    SignSplitRule and the sign-split numerics alpha-beta and gamma share
    gamma.py        Gamma
    alpha_beta.py   AlphaBeta, ZPlus
    flat.py         Flat
    wsquare.py      WSquare
    zbox.py         ZBox
    recurrent.py    RecurrentRule: LSTM/GRU (run by relprop.recurrent)
    norm.py         LayerNormRule (RMSNorm: its normaliser held constant)
    identity.py     IdentityRule: element-wise non-linearities, R_x = R_y
    proportional.py StabilizedRatio, ProportionalRelu: sums split in proportion
    attention.py    AttnLRP, CPLRP: softmax, bilinear products, attention; cosine similarity
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
    FusedLayer,
    Incoming,
    LayerRuleFunction,
    Propagated,
    Rule,
    RuleBase,
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
from .identity import IdentityRule
from .norm import LayerNormRule
from .proportional import ProportionalRelu, StabilizedRatio
from .recurrent import RecurrentRule
from .signsplit import SignSplitRule
from .wsquare import WSquare
from .zbox import ZBox, check_bounds

__all__ = [
    "BIAS_MODES", "EPSILON_WHY", "RELU", "TINY", "Activation", "BoundLayer", "Incoming",
    "Modifier", "Propagated", "Rule", "RuleBase", "Tally", "check_bounds", "check_nonnegative",
    "is_number", "keep_top_k", "safe_divide", "stabilize",
    "FusedLayer", "LayerRuleFunction",
    "AttentionRule", "AttnLRP", "CPLRP", "cosine_similarity", "scaled",
    "LRP0", "AlphaBeta", "Epsilon", "Flat", "Gamma", "RecurrentRule", "SignSplitRule", "WSquare",
    "ZBox", "ZPlus",
    "IdentityRule", "LayerNormRule", "ProportionalRelu", "StabilizedRatio",
]
