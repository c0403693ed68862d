"""``python -m e2ed2.engine.cli`` = ``e2ed2``."""

import sys

from .main import main

sys.exit(main())
