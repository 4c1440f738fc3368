"""``python -m medseg.pacs``: the PACS subcommands without the ``medseg`` entry point."""

from __future__ import annotations

from medseg.pacs.cli import main

raise SystemExit(main())
