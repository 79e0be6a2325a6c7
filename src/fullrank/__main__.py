"""``python -m fullrank``: the ``fullrank`` command line."""
from .cli import main

raise SystemExit(main())
