"""The DeepSpeed ZeRO-3 trainer: weighted SFT over token records, weight export, HF checkpoints.

Knows nothing of vLLM."""
