"""pmc: unlearning in LLMs by Partial Model Collapse (vLLM rollouts, DeepSpeed ZeRO-3 training, Ray)."""

__version__ = "0.1.0"
