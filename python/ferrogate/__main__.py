"""``python -m ferrogate`` is the ``ferrogate`` command."""

import sys

from ferrogate.cli import main

sys.exit(main())
