"""``python -m minigpt``: the ``minigpt`` command."""

import sys

from minigpt.cli import main

sys.exit(main())
