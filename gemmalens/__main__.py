"""``python -m gemmalens ...``: the same as the ``gemmalens`` command."""

import sys

from gemmalens.cli import main

sys.exit(main())
