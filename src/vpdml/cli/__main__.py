"""``python -m vpdml.cli`` (and ``accelerate launch -m vpdml.cli``) runs the ``vpdml`` command."""

import sys

from vpdml.cli import main

sys.exit(main())
