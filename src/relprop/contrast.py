"""Contrastive targets: "why a and not b", for any model whose output has classes.

`contrast(a, b)` is a target like any other (`Explainer(model)(x, target=contrast(3, 5))`):
the backward pass starts from output a minus output b, so the relevance is the
difference of the two single explanations (the seed is linear; relprop.targets.seeding).
a and b take every target form: ints, one per sample, K per sample (then K contrasts
from one forward), (position, token) tuples for a language model; a=None is the
predicted class.
"""

from __future__ import annotations

from .errors import TargetError
from .targets import Contrast, Target

__all__ = ["Contrast", "contrast"]


def contrast(a: Target, b: Target) -> Contrast:
    """The target "output a minus output b" (a=None: the predicted class)."""
    if b is None:
        raise TargetError("contrast(a, b): b is the output to contrast against; give it")
    if isinstance(a, Contrast) or isinstance(b, Contrast):
        raise TargetError("contrast(a, b): a and b are plain targets, not contrasts")
    return Contrast(a, b)
