"""``python -m pvt.cli``: the ``pvt`` command."""

import sys

from pvt.cli import main

sys.exit(main())
