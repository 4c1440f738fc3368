"""Stage 3b — sliding-window prediction and writing outputs on the input grid."""
