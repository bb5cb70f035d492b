"""The rewritten model: a list of steps that compute the same forward values as
the user's model but carry LRP rules in their backward.

Built once per model and composite (`Program.build`, plan.py), run for every
batch (`Program.run`, run.py; what a recorded run keeps: recording.py).
Parameters are read from the model at every run (detached), so the program
always explains the model as it is now and never writes to it.
"""

from .plan import LayerCall, Step
from .recording import Recording, RunResult
from .run import Program

__all__ = ["LayerCall", "Program", "Recording", "RunResult", "Step"]
