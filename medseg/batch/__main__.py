"""``python -m medseg.batch``: run ``medseg batch`` standalone."""

from __future__ import annotations

from medseg.batch.cli import main

raise SystemExit(main())
