"""vLLM's `language_model_only` on a multimodal checkpoint: engine parameters, start-up seconds and
greedy tokens with and without it, each engine in a process of its own (vLLM's Transformers backend,
float32, as the rollout worker starts it on this CPU install).

    .venv/bin/python benchmarks/language_model_only.py --out benchmarks/results/language_model_only.json

The model is `pmc make-tiny gemma-3` (built into a temporary folder unless --model names one). Also
printed: the parameters such an engine skips for google/gemma-3-12b-it, counted on the meta device
from the published SigLIP-so400m tower config and the projector's shape (not loaded, not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = [2, 100, 200, 300, 400]


def one_engine(model: str, language_model_only: bool) -> dict:
    """Run in a child process: start the engine, count its parameters, greedy-decode one prompt."""
    import time

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=model, dtype="float32", max_model_len=256, model_impl="transformers", enforce_eager=True,
              language_model_only=language_model_only, generation_config="vllm", enable_chunked_prefill=False)
    seconds = time.perf_counter() - start
    parameters = llm.apply_model(lambda m: sum(p.numel() for p in m.parameters()))[0]
    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], SamplingParams(max_tokens=12, temperature=0))
    return {"language_model_only": language_model_only, "start_seconds": round(seconds, 1),
            "engine_parameters": parameters, "greedy_tokens": list(out[0].outputs[0].token_ids)}


def gemma_3_12b_vision_parameters() -> int:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tower = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                               image_size=896, patch_size=14, vision_use_head=False)
    with torch.device("meta"):
        model = SiglipVisionModel(tower)
    projector = 1152 * 3840 + 1152  # mm_input_projection_weight + mm_soft_emb_norm (text hidden size 3840)
    return sum(p.numel() for p in model.parameters()) + projector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a multimodal checkpoint folder (default: a fresh tiny Gemma-3)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_engine(args.child[0], args.child[1] == "1")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from pmc_pipeline.models.families import make_tiny_family

            model = str(make_tiny_family("gemma-3", Path(tmp) / "gemma-3"))
        runs = []
        for flag in ("0", "1"):
            done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--child", model, flag],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    skipped = gemma_3_12b_vision_parameters()
    result = {"model": args.model or "pmc make-tiny gemma-3", "runs": runs,
              "same_greedy_tokens": runs[0]["greedy_tokens"] == runs[1]["greedy_tokens"],
              "gemma_3_12b_skipped_parameters": skipped, "gemma_3_12b_skipped_gib_bf16": round(skipped * 2 / 2**30, 2)}
    print(json.dumps(result, indent=2))
    tmp_out = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)


if __name__ == "__main__":
    main()
