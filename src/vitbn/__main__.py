"""``python -m vitbn`` (also what ``torchrun -m vitbn`` starts)."""

import sys

from vitbn.cli import console_main

# A rank of a distributed run leaves with os._exit once its output is flushed (vitbn.engine.distributed.exit_process):
# the interpreter's finalization would race the process group's native threads.
sys.exit(console_main())
