"""``python -m eval_jobs eval ...`` (the same command as ``birkhoff eval``)."""

from .cli import main

raise SystemExit(main())
