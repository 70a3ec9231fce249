"""`python -m training <command> ...`: the `multidomain train` commands."""

import sys

from training.cli import main

sys.exit(main())
