"""Graph passes: from a traced graph to one every node of which has a rule family.

Each pass takes the fx graph (with OpSpecs in `node.meta["relprop"]`) and
changes it in place; they run in the order of `canonize` (pipeline.py). One
module per pass: functionalize (module calls -> functional calls), inplace
(out_of_place), padding (normalize_padding), classify (mark_dynamic,
classify_nodes), batchnorm (folding, affine), signs (mark_nonneg, positive_only;
read by the planner).
"""

from .pipeline import canonize
from .signs import mark_nonneg, positive_only

__all__ = ["canonize", "mark_nonneg", "positive_only"]
