"""Explain a whole dataset: sharded, resumable, one process or many (torchrun).

explain_dataset writes safetensors shards and a manifest; load_explanations reads them
back lazily. Modules: store (what is kept), shards (atomic files), manifest (run identity),
distributed (the split by rank), images (image files and folders as datasets), job (a
run's set-up, resume scan and shard loop, shared with relprop.concepts.collect), run, reader.
The `relprop explain-dataset` command is relprop.apps.dataset_cli.
"""

from __future__ import annotations

from .images import ImageFiles
from .reader import Explanations, load_explanations
from .run import RunSummary, explain_dataset
from .store import Store

__all__ = ["ImageFiles", "Explanations", "load_explanations", "RunSummary", "explain_dataset",
           "Store"]
