"""Stage 3 — training."""
