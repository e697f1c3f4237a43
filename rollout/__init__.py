"""The vLLM rollout worker: batched sampling, greedy answers and in-place weight updates.

Knows nothing of rewards or losses."""
