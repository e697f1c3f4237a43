"""The method: the PMC loop and its parts (rewards, selection, PMC-fast, PMC-alignment, restarts)."""
