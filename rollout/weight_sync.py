"""vLLM worker extension: replace the running model's weights in place (no engine restart).

vLLM mixes this class into its worker (`LLM(worker_extension_cls=...)`), so the methods run where the
model lives and are reached with `llm.collective_rpc(name, args=...)`. Tensors travel as safetensors
bytes: rpc arguments are serialised, and plain bytes cross every transport vLLM uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

Shapes = Mapping[str, tuple[int, ...]]


class WeightMismatchError(ValueError):
    """The new weights do not fit the running model; nothing was loaded, the engine is intact."""


def check_shapes(got: Shapes, expected: Shapes, optional: frozenset[str] = frozenset()) -> None:
    """Raise WeightMismatchError unless `got` has exactly the expected names and shapes.

    vLLM's loader only warns about missing tensors and can fail half-way on a wrong shape, so the
    check runs before anything is copied into the model.
    """
    missing = sorted(set(expected) - set(got) - optional)
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{n}: {got[n]} != {expected[n]}" for n in sorted(set(got) & set(expected)) if got[n] != expected[n]]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise WeightMismatchError("weights do not match the running model: " + "; ".join(parts))


def transformers_shapes(hf_config) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """Names/shapes of transformers' `state_dict()` for `hf_config`, and the names that may be left out.

    Built on the meta device (no memory). Tied aliases (e.g. lm_head.weight when embeddings are tied)
    are in `state_dict()` but not in checkpoints, so either form is accepted.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    parameters = {name for name, _ in model.named_parameters()}
    return shapes, frozenset(shapes) - parameters


class WeightSyncExtension:
    """Methods added to vLLM's worker; `self` is the worker (it has `model_config`, `reload_weights`)."""

    def pmc_load_weights(self, blob: bytes) -> int:
        """Load a full state dict given as safetensors bytes (HF names); returns the tensor count."""
        from safetensors.torch import load

        return self._pmc_reload(load(blob))

    def pmc_load_checkpoint(self, model_dir: str) -> int:
        """Load the weights of an HF checkpoint folder (*.safetensors) of the same architecture."""
        from safetensors.torch import load_file

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise WeightMismatchError(f"no *.safetensors files in {model_dir}")
        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            state_dict.update(load_file(file))
        return self._pmc_reload(state_dict)

    def _pmc_reload(self, state_dict: dict[str, torch.Tensor]) -> int:
        if not hasattr(self, "_pmc_expected"):
            from vllm.config import set_current_vllm_config

            # Models vLLM runs on its Transformers backend (e.g. Phi here) have their transformers
            # classes wrapped by vLLM's compile decorator in this process: building one, even on the
            # meta device, needs vLLM's current config set, as it is while vLLM builds the model.
            with set_current_vllm_config(self.vllm_config):
                self._pmc_expected = transformers_shapes(self.model_config.hf_config)
        expected, optional = self._pmc_expected
        check_shapes({name: tuple(t.shape) for name, t in state_dict.items()}, expected, optional)
        # The worker's reload_weights sets vLLM's current config around model_runner.reload_weights.
        self.reload_weights(weights_iterator=iter(state_dict.items()))
        return len(state_dict)
