"""The shadow channel: relevance that gradient form cannot carry.

Autograd carries c = R / a, so relevance that lands on a value a = 0 is lost:
a bias share handed to a unit a ReLU switched off (`bias="distribute"`), the
flat and w-square rules on zero inputs, sigmoid(0) passing its relevance to
an input that is exactly 0. Such relevance travels on a second channel: every
value a on the way gets a *shadow*, a zero tensor of a's shape computed from
its inputs' shadows, whose gradient is relevance itself (not divided by a).

Which values get a shadow is decided once per program (`plan_shadows`, roles.py): the
inputs of the ops that produce direct relevance (producers), and, backwards
from them, the inputs of every op the shadow can cross:

- moves (reshape, flatten, cat, split, indexing, padding, dropout): the same
  op applied to the shadow carries relevance with the values;
- max pooling: the shadow is gathered at the value's argmax (winner takes all);
- identity-rule activations (ReLU, tanh, sigmoid, ...): R passes unchanged;
  it re-enters gradient form where the input is non-zero;
- sums (x + y, sum, mean, average pooling): proportional split, and an equal
  split where the sum is exactly 0 (ShadowSum, functions.py);
- scaling by a constant, and a signal times a gate: R passes unchanged (to
  the signal).

A shadow stops at a dense/conv layer (the relevance joins the layer's own
before its rule), at a model input (the shadow is a leaf whose gradient adds
to the input relevance) and at ops it cannot cross (normalisation, gated
products, recurrent layers): there what it carries is lost and the ledger
shows it as "other".
"""

from .functions import ShadowIdentity, ShadowSum
from .roles import Role, plan_shadows, zero_preserving
from .runners import RUNNERS, Shadowed, run_shadowed

__all__ = ["RUNNERS", "Role", "ShadowIdentity", "ShadowSum", "Shadowed", "plan_shadows",
           "run_shadowed", "zero_preserving"]
