"""``python -m nnrelief``: the ``nnrelief`` command."""

from .cli import main

raise SystemExit(main())
