"""kvmemd: the per-GPU daemon that owns physical pages and lends them to engine processes."""
