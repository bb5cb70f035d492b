"""relprop: Layer-wise Relevance Propagation for any PyTorch model, in one backward pass."""

from .composites import PRESETS, Composite, LayerInfo, make_composite
from .contrast import Contrast, contrast
from .dataset import explain_dataset, load_explanations
from .errors import (
    CompositeError,
    InputError,
    NoLedgerError,
    RelpropError,
    TargetError,
    TraceError,
    UnsupportedOperationError,
)
from .explain import Explainer, Explanation, explain
from .generation import Generation, explain_generation
from .ledger import Ledger, LedgerEntry
from .registry import register_function, register_module
from .rules import (
    CPLRP,
    LRP0,
    AlphaBeta,
    AttentionRule,
    AttnLRP,
    Epsilon,
    Flat,
    Gamma,
    RecurrentRule,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
)

__all__ = [
    "PRESETS", "Composite", "LayerInfo", "make_composite",
    "CompositeError", "InputError", "NoLedgerError", "RelpropError", "TargetError", "TraceError",
    "UnsupportedOperationError",
    "Explainer", "Explanation", "explain", "explain_dataset", "load_explanations",
    "Contrast", "contrast", "Generation", "explain_generation",
    "Ledger", "LedgerEntry",
    "register_function", "register_module", "RecurrentRule",
    "LRP0", "AlphaBeta", "Epsilon", "Flat", "Gamma", "Rule", "WSquare", "ZBox", "ZPlus",
    "AttentionRule", "AttnLRP", "CPLRP",
]
__version__ = "0.1.0"
