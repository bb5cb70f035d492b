"""Dataset-wide analysis on top of explain_dataset: find a Clever Hans, and fix it.

- spray (spray.py): spectral relevance analysis per class with CoRelAy's processors; an
  analysis file in ViRelAy's layout, members readable from Python, the eigenvalue plot.
- prototypes (prototypes.py): PCX, a Gaussian mixture per class over per-sample
  concept-relevance vectors of one layer.
- clarc (clarc.py): projective ClArC, a corrected copy of the model.
- export_virelay (virelay_export.py): a ViRelAy project.

The command line (`relprop analyze`), relprop's static HTML page of the findings and the
planted Clever Hans on real MNIST digits that proves all this are on the application side
(relprop.apps.analyze).

CoRelAy, scikit-learn, h5py and ViRelAy are the `relprop[analysis]` extra, imported only when
used. The analysis runs on one machine; the explanations may come from many (torchrun).
"""

from __future__ import annotations

from .clarc import ClarcResult, clarc
from .prototypes import PrototypeResult, concept_vectors, prototypes
from .spray import ClassAnalysis, SprayResult, SpraySettings, load_spray, spray
from .virelay_export import export_virelay

__all__ = ["ClarcResult", "clarc", "PrototypeResult", "concept_vectors",
           "prototypes", "export_virelay", "ClassAnalysis",
           "SprayResult", "SpraySettings", "load_spray", "spray"]
