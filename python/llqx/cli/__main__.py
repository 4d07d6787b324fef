"""`python -m llqx.cli`: the `llqx` command."""

import sys

from . import main

sys.exit(main())
