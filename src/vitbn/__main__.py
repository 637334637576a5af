"""``python -m vitbn`` (also what ``torchrun -m vitbn`` starts)."""

import sys

from vitbn.cli import main

sys.exit(main())
