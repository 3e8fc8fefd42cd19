"""Turning prototype evidence into boxes and figures (torch-free: numpy and Pillow)."""
