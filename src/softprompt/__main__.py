"""`python -m softprompt ...` (also what `torchrun -m softprompt` and `accelerate launch -m softprompt` run)."""

import sys

from .cli import main

sys.exit(main())
