"""Stage 3a — networks, device/precision choice and the model directory."""
