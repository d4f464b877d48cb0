"""``python -m anglekit``: the ``anglekit`` command, also for ``torchrun -m anglekit``."""

import sys

from anglekit.cli import main

sys.exit(main())
