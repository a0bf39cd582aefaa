"""The whole adaptive loop as one compiled program (``solve(..., compile=True)``).

- :mod:`.loop`: the loop written as pure tensor code (``torch.while_loop``), the same step,
  norm, controller rule and dense output as the eager loop.
- :mod:`.program`: which solves it takes, the compiled programs kept per process, running one.
- :mod:`.reverse`: DirectAdjoint's reverse pass over the loop's recorded steps, a second program.
"""

from .loop import LoopSpec, run_loop
from .program import LoopProgram, compiled_loop, loop_refusal, program_count

__all__ = ["LoopProgram", "LoopSpec", "compiled_loop", "loop_refusal", "program_count", "run_loop"]
