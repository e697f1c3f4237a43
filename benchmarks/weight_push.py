"""One weight push on SmolLM2-135M-Instruct (float32, ~650 MB): seconds, bytes, and trainer rank 0's
peak resident-memory growth during the push, 2 ZeRO-3 ranks and 1 vLLM engine.

    .venv/bin/python benchmarks/weight_push.py --out benchmarks/results/weight_push_blob.json

This is the blob path (trainer rank 0 gathers the full state dict, serialises it to safetensors bytes,
the engine loads them from Ray's object store): the "before" of the streamed push, which replaces it.
Rank 0's memory is sampled every 2 ms from outside, by its process id.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="runs/smollm2-float32", help="exported here first when missing")
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import psutil
    import ray

    from pmc_pipeline.models.smollm2 import export_smollm2
    from rollout.actor import start_rollout_actor, wait_until_ready
    from rollout.client import RolloutClient
    from rollout.config import RolloutConfig
    from trainer.config import TrainerConfig, TrainerJob
    from trainer.group import TrainerGroup

    model = str(export_smollm2(args.model_dir))
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    actor = start_rollout_actor(RolloutConfig(max_model_len=512), model, "float32", 0, use_gpus=False)
    wait_until_ready(actor)
    client = RolloutClient([actor])
    group = TrainerGroup(TrainerConfig(world_size=2), TrainerJob(model_path=model, dtype="float32", seed=0,
                                                                 micro_batch_size=2, total_steps=None, on_gpus=False))
    rank0 = psutil.Process(group._processes[0][1])
    pushes = []
    for _ in range(args.pushes):
        base, peak, done = rank0.memory_info().rss, [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rank0.memory_info().rss - base)
                done.wait(0.002)

        watcher = threading.Thread(target=sample)
        watcher.start()
        start = time.perf_counter()
        loaded = client.load_weights(group.export_weights())
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        pushes.append({"seconds": seconds, "bytes": loaded["bytes"], "rank0_peak_rss_growth_bytes": peak[0]})
        print(pushes[-1], flush=True)
    Path(args.out).write_text(json.dumps({"path": "blob", "model": "SmolLM2-135M-Instruct float32",
                                          "pushes": pushes}, indent=1))
    group.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
