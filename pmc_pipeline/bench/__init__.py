"""`pmc bench`: side-by-side speed figures of the pipeline's parts and of one PMC epoch.

Each section measures one part against the way the reference code does the same work, on the same
inputs, and adds `Figure`s (every figure keeps all its repeats: min / median / max):

- reward_section:  the project's ROUGE-L scorer vs rouge-score's per-pair scorer (identical scores)
- rollout_section: the vLLM worker vs Hugging Face `generate` (same model, prompts and sampling)
- pipeline_section: ZeRO-3 trainer throughput and memory, weight push, one pipeline epoch
- reference_epoch: one epoch the reference's way (HF generate inside every training step)
- runner:          builds the demo model, runs the sections on ONE Ray instance and ONE engine,
                   writes bench.json and bench.md
"""
