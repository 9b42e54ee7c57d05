"""``python -m birkhoff ...`` (the same command as ``birkhoff``)."""

import sys

from .cli import main

sys.exit(main())
