"""`python -m scaleforge` is the `scaleforge` command."""

import sys

from scaleforge.cli import main

sys.exit(main())
