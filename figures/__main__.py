"""``python -m figures``: see :mod:`figures.cli`."""

import sys

from .cli import main

sys.exit(main())
