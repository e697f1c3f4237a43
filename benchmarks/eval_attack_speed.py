"""Sampling attack on TOFU forget10 (400 questions x k samples): vLLM vs Hugging Face `generate`.

Both back ends run the same `pmc_pipeline.eval.attacks.sampling_attack` (same prompts, k, T, top-p and
max_tokens) on the same small model, in one run of this script. HF `generate` gets one batched call
per question (num_return_sequences=k). If HF is too slow for all 400 questions on this machine,
time it on the first `--hf-questions` questions and extrapolate linearly (labelled as such).

    .venv/bin/python benchmarks/eval_attack_speed.py --out benchmarks/results/eval_attack_speed.json

The model is the test suite's tiny random-init Llama (head_dim 32, a BPE tokenizer trained on TOFU
text; ~0.6 M parameters unless --hidden-size says otherwise). A random model rarely stops early, so
almost every sample runs to max_tokens on both back ends: the token counts are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class HFGenerateRollout:
    """The `sample` surface of the rollout worker, on transformers' `generate` (one call per prompt)."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.generated_tokens = 0

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        from rollout.worker import Completion

        torch, eos = self.torch, self.tokenizer.eos_token_id
        if seed is not None:
            torch.manual_seed(seed)
        result = []
        for ids in prompt_ids:
            with torch.no_grad():
                out = self.model.generate(torch.tensor([ids]), do_sample=True, temperature=temperature, top_p=top_p,
                                          top_k=0, max_new_tokens=max_tokens, num_return_sequences=n,
                                          eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id or eos)
            row = []
            for seq in out[:, len(ids):].tolist():
                finished = eos in seq
                seq = seq[:seq.index(eos)] if finished else seq
                self.generated_tokens += len(seq)
                row.append(Completion("", tuple(seq), finished))
            result.append(row)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tofu-dir", default=str(REPO.parent / "shared" / "data" / "tofu"))
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--hf-questions", type=int, default=8, help="questions timed with HF generate (400: all)")
    parser.add_argument("--hf-threads", type=int, default=1,
                        help="torch threads for HF generate (vLLM-CPU serves with one OpenMP thread here)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_attack_speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    load_at_start = os.getloadavg()[0]

    from pmc_pipeline.data.prompts import PromptFormatter
    from pmc_pipeline.eval.attacks import sampling_attack
    from pmc_pipeline.models.source import load_tokenizer
    from pmc_pipeline.models.tiny import TinyModelSpec, build_tiny_model

    tofu = Path(args.tofu_dir)
    rows = read_jsonl(tofu / "forget10.json")
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for s in ("forget10", "retain90")
             for r in read_jsonl(tofu / f"{s}.json")]
    workdir = Path(tempfile.mkdtemp(prefix="pmc-bench-"))
    model_dir = build_tiny_model(texts, workdir / "tiny", TinyModelSpec(vocab_size=1024, hidden_size=args.hidden_size,
                                                                       intermediate_size=2 * args.hidden_size, seed=0))
    formatter = PromptFormatter(load_tokenizer(str(model_dir)), "plain")
    params = {"k": args.k, "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
              "seed": 0}
    full_generations = len(questions) * args.k

    # HF generate first: the vLLM engine later binds this process's OpenMP threads to cores.
    hf = HFGenerateRollout(model_dir)
    import torch

    torch.set_num_threads(args.hf_threads)
    hf_threads = torch.get_num_threads()
    n_hf = min(args.hf_questions, len(questions))
    start = time.perf_counter()
    sampling_attack(hf, formatter, questions[:n_hf], answers[:n_hf], **params)
    hf_seconds = time.perf_counter() - start
    hf_generations = n_hf * args.k
    hf_full_seconds = hf_seconds * full_generations / hf_generations
    print(f"HF generate: {hf_generations} generations in {hf_seconds:.1f} s "
          f"({hf_generations / hf_seconds:.1f} gen/s, {hf.generated_tokens / hf_seconds:.0f} tok/s)"
          + ("" if n_hf == len(questions) else
             f"; EXTRAPOLATED to {full_generations}: {hf_full_seconds:.0f} s"))
    hf_tokens = hf.generated_tokens
    del hf

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rollout.worker import RolloutSettings, RolloutWorker

    start = time.perf_counter()
    worker = RolloutWorker(RolloutSettings(model_path=str(model_dir), max_model_len=512, cpu_kv_cache_gib=2.0))
    startup = time.perf_counter() - start
    tokens_before = worker.stats()["generated_tokens"]
    start = time.perf_counter()
    result = sampling_attack(worker, formatter, questions, answers, **params)
    vllm_seconds = time.perf_counter() - start
    vllm_tokens = worker.stats()["generated_tokens"] - tokens_before
    worker.close()
    print(f"vLLM: {full_generations} generations in {vllm_seconds:.1f} s ({full_generations / vllm_seconds:.1f} gen/s, "
          f"{vllm_tokens / vllm_seconds:.0f} tok/s; engine start-up {startup:.1f} s not included); "
          f"mean worst-case recall {result.mean_worst_case_recall:.3f}")
    print(f"speed-up (HF {'extrapolated' if n_hf < len(questions) else 'measured'} / vLLM): "
          f"{hf_full_seconds / vllm_seconds:.1f}x")

    report = {
        "task": "TOFU forget10 sampling attack", "questions": len(questions), "generations": full_generations,
        "settings": params, "model": {"kind": "tiny random-init Llama", "hidden_size": args.hidden_size,
                                      "parameters": _parameters(model_dir)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    # other work on the machine slows both back ends: keep the load with the figures
                    "load_average_1min_at_start": round(load_at_start, 2),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "hf_generate": {"torch_threads": hf_threads, "questions_timed": n_hf, "generations_timed": hf_generations, "seconds": round(hf_seconds, 2),
                        "generated_tokens": hf_tokens,
                        "generations_per_second": round(hf_generations / hf_seconds, 2),
                        "full_seconds": round(hf_full_seconds, 1), "full_is_extrapolated": n_hf < len(questions)},
        "vllm": {"generations": full_generations, "seconds": round(vllm_seconds, 2), "generated_tokens": vllm_tokens,
                 "generations_per_second": round(full_generations / vllm_seconds, 2),
                 "engine_startup_seconds": round(startup, 1)},
        "speedup": round(hf_full_seconds / vllm_seconds, 2),
        "command": " ".join(["python", "benchmarks/eval_attack_speed.py"] + sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"written: {out}")


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


if __name__ == "__main__":
    main()
