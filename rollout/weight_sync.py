"""vLLM worker extension: load a checkpoint folder into the running model (no engine restart).

vLLM mixes this class into its worker (`LLM(worker_extension_cls=...)`), so the methods run where the
model lives and are reached with `llm.collective_rpc(name, args=...)`. vLLM imports this module in
its worker before building the model: importing rollout.gloo_transfer here registers the gloo
weight-transfer backend there. Trainer weights arrive through that protocol, not through here; both
paths check names and shapes with rollout/weight_names.py first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rollout.gloo_transfer import register
from rollout.weight_names import WeightMismatchError, check_checkpoint, tie_output_embedding

register()  # the "gloo" weight-transfer backend, in vLLM's worker (which imports this module first)


class WeightSyncExtension:
    """Methods added to vLLM's worker; `self` is the worker (it has `vllm_config`, `reload_weights`)."""

    def pmc_load_checkpoint(self, model_dir: str) -> int:
        """Load the weights of an HF checkpoint folder (*.safetensors) of the same architecture."""
        from safetensors.torch import load_file

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise WeightMismatchError(f"no *.safetensors files in {model_dir}")
        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            state_dict.update(load_file(file))
        return self._pmc_reload(tie_output_embedding(self.vllm_config, model_dir, state_dict))

    def _pmc_reload(self, state_dict: dict[str, torch.Tensor]) -> int:
        check_checkpoint(self.vllm_config, {name: tuple(t.shape) for name, t in state_dict.items()})
        # The worker's reload_weights sets vLLM's current config around model_runner.reload_weights.
        self.reload_weights(weights_iterator=iter(state_dict.items()))
        return len(state_dict)
