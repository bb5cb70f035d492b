"""The op catalogue: what relprop knows of each traced operation (its rule family,
`classify`), the data model it hands to the passes and the planner (`Kind`,
`OpSpec`) and how an op is named in error messages. Pure lookup: nothing here
rewrites a graph (that is relprop.passes).
"""

from .aten import meaning
from .catalogue import (
    GATES,
    STATISTIC_METHODS,
    STATISTICS,
    classify,
    conv_padding,
    ntuple,
    pad_arguments,
)
from .locations import node_location, node_path, original_label, user_frame
from .spec import SPEC, Kind, OpSpec, node_args, spec

__all__ = ["GATES", "SPEC", "STATISTICS", "STATISTIC_METHODS", "meaning", "Kind", "OpSpec",
           "classify", "conv_padding", "node_args",
           "node_location", "node_path", "ntuple", "original_label", "pad_arguments", "spec",
           "user_frame"]
