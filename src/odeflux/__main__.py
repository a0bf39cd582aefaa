"""``python -m odeflux``: the ``odeflux`` command line."""

from .cli import main

raise SystemExit(main())
