"""Weight pushes on SmolLM2-135M-Instruct (float32, ~540 MB): seconds, bytes, and trainer rank 0's
peak resident-memory growth during each push, 2 ZeRO-3 ranks and 1 vLLM engine, placed as
`pmc unlearn` places them.

    .venv/bin/python benchmarks/weight_push.py --out benchmarks/results/weight_push_streamed.json

The streamed push: vLLM's weight-transfer protocol (our gloo backend on CPUs), whole layers gathered
from the ZeRO-3 shards per `--bucket-mb`. Rank 0's memory is sampled every 2 ms from outside, by its
process id, as the blob path's was (benchmarks/results/weight_push_blob.json; that script is in git
history: `git show b220de5:benchmarks/weight_push.py`).
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
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import psutil

    from pmc_pipeline.config import from_mapping
    from pmc_pipeline.models.smollm2 import export_smollm2
    from pmc_pipeline.recipes.roles import open_session, trainer_job

    model = str(export_smollm2(args.model_dir))
    cfg = from_mapping("unlearn", {"model": {"path": model}, "run_dir": "unused", "trainer": {"world_size": 2},
                                   "rollout": {"max_model_len": 512, "weight_bucket_mb": args.bucket_mb}})
    with open_session(cfg) as session:
        rollout = session.rollout(model, cfg.rollout, "float32", 0)
        trainer = session.trainer(cfg.trainer, trainer_job(cfg, model, 2, None))
        try:
            session.connect_weight_push(trainer, rollout, cfg.rollout)
            rank0 = psutil.Process(trainer.rank_pids()[0])
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
                pushed = trainer.push_weights()
                seconds = time.perf_counter() - start
                done.set()
                watcher.join()
                pushes.append({"seconds": seconds, "bytes": pushed["bytes"], "rank0_peak_rss_growth_bytes": peak[0],
                               "rank0_peak_rss_growth_bytes_inside": pushed["peak_rss_growth_bytes"]})
                print(pushes[-1], flush=True)
        finally:
            trainer.shutdown()
    Path(args.out).write_text(json.dumps({"path": "streamed", "model": "SmolLM2-135M-Instruct float32",
                                          "bucket_mb": args.bucket_mb, "pushes": pushes}, indent=1))


if __name__ == "__main__":
    main()
