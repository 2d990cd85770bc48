"""``python -m fastpeft.demo``: the same as ``fastpeft demo``."""
from . import main

raise SystemExit(main())
