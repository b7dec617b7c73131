"""Small, deterministic evaluation data sets that need no download."""
