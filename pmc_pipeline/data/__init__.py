"""Data: TOFU splits and user files (checked row by row), evaluation splits, the demo's authors, prompts."""
