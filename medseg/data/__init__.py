"""Stage 2 — datasets, planning and MONAI transforms."""
