"""`python -m llqx ...`: the same as the `llqx` console script."""

import sys

from .cli import main

sys.exit(main())
