"""The rewritten model: a list of steps that compute the same forward values as
the user's model but carry LRP rules in their backward.

Built once per model and composite (`Program.build`: plan.py, with each rule
family's call from calls.py and the fused form from fusion.py; steps.py holds the
immutable Step), run for every batch (`Program.run`, run.py; what a recorded run
keeps: recording.py).
Parameters are read from the model at every run (detached), so the program
always explains the model as it is now and never writes to it.
"""

from .calls import LayerCall
from .recording import Recording, RunResult
from .run import Program
from .steps import Step

__all__ = ["LayerCall", "Program", "Recording", "RunResult", "Step"]
