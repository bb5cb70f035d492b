"""`structured_output`: a torch.export graph returns its outputs flattened (a
Seq2SeqLMOutput as the tuple (logits, encoder_last_hidden_state)); the output node is
given the model's own structure back from the export's output spec, so that an output
object is explained the same way whichever tracer produced the graph (relprop.targets
reads its `logits`). fx graphs return the model's own structure already.
"""

from __future__ import annotations

import torch.utils._pytree as pytree
from torch import fx


def structured_output(graph: fx.Graph) -> None:
    """The output node's flat list of values, unflattened by the export's out_spec."""
    info = getattr(graph._codegen, "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if spec is None or out is None or not isinstance(out.args[0], tuple | list):
        return
    flat = list(out.args[0])
    if spec.num_leaves != len(flat):
        return
    out.args = (pytree.tree_unflatten(flat, spec),)
