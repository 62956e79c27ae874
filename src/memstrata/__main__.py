"""`python -m memstrata ...` (and `torchrun -m memstrata train ...`): the command line."""

import sys

from .cli import main

sys.exit(main())
