"""The op vocabulary: what each traced operation is, whatever its spelling
(`meaning`, `is_op`; relprop.ops.vocabulary), its rule family and OpSpec
(`classify`), and how an op is named in error messages. Pure lookup: nothing here
rewrites a graph (that is relprop.passes).
"""

from .catalogue import classify, pad_arguments
from .locations import node_location, node_path, original_label, user_frame
from .spec import SPEC, Kind, OpSpec, node_args, spec
from .vocabulary import Op, identity, is_op, lookup, max_pool_with_indices, meaning

__all__ = ["SPEC", "Kind", "Op", "OpSpec", "classify", "identity", "is_op", "lookup",
           "max_pool_with_indices", "meaning", "node_args", "node_location", "node_path",
           "original_label", "pad_arguments", "spec", "user_frame"]
