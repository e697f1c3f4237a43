"""Models: where a model comes from and its up-front checks; the tiny and SmolLM2 demo models."""
