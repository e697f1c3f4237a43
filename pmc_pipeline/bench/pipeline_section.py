"""The pipeline's own figures: ZeRO-3 trainer throughput and memory, weight push, and PMC epochs
(pipeline vs reference-style) with a per-phase profile."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from pmc_pipeline.bench.figures import BenchReport, timed
from pmc_pipeline.bench.reference_epoch import ReferenceStyleEpochs
from pmc_pipeline.method.loop import PMCLoop
from trainer.records import TrainExample

MIB = 2**20


def _rank_memory(_rank_actor: Any) -> dict[str, float]:
    """Runs inside a trainer rank's process: its peak resident memory (and peak GPU memory if any)."""
    import resource

    import torch

    report = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        report["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
    return report


def rank_memory(trainer: Any) -> list[dict[str, float]]:
    """Peak memory of every rank of a TrainerGroup (its rank actors run `_rank_memory`)."""
    import ray

    return ray.get([actor.__ray_call__.remote(_rank_memory) for actor in trainer.actors])


def bench_trainer(report: BenchReport, trainer: Any, batches: list[list[TrainExample]],
                  role_weights: dict[str, float], repeats: int) -> None:
    """trainer.tokens_per_s (prompt + answer tokens through forward and backward), peak memory, shard size."""
    tokens = sum(len(ex.input_ids) for batch in batches for ex in batch)
    rates = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: trainer.train_epoch(batches, role_weights))
        rates.append(tokens / seconds)
    world = trainer.world_size
    report.add("trainer.tokens_per_s", "tokens/s", rates,
               f"ZeRO-3, world size {world}, {len(batches)} steps of {len(batches[0])} examples")
    memory = rank_memory(trainer)
    report.add("trainer.peak_rss_per_rank", "MiB", [m["peak_rss_mib"] for m in memory],
               "peak resident memory of each rank process (values: one per rank)")
    if all("peak_gpu_mib" in m for m in memory):
        report.add("trainer.peak_gpu_memory_per_rank", "MiB", [m["peak_gpu_mib"] for m in memory])
    shards = trainer.shard_reports()
    owned = [sum(p["local_numel"] for p in shard.values()) for shard in shards]
    full = sum(p["full_numel"] for p in shards[0].values())
    report.add("trainer.parameter_share_per_rank", "fraction", [o / full for o in owned],
               f"ZeRO-3 shard of the {full:,} parameters each rank owns (values: one per rank)")


def bench_weight_push(report: BenchReport, trainer: Any, repeats: int) -> None:
    """weight_push.seconds (streamed from the ZeRO-3 shards into every engine), .bytes and rank 0's
    peak memory growth during a push."""
    pushes = [trainer.push_weights() for _ in range(repeats)]
    report.add("weight_push.seconds", "s", [p["seconds"] for p in pushes],
               "vLLM weight-transfer protocol: gather whole layers per bucket on the ranks, rank 0 sends")
    report.add("weight_push.bytes", "MiB", [p["bytes"] / MIB for p in pushes], "every parameter once")
    report.add("weight_push.rank0_peak_rss_growth", "MiB", [p["peak_rss_growth_bytes"] / MIB for p in pushes],
               "rank 0's resident memory above its level before the push")


def bench_epochs(report: BenchReport, loop: PMCLoop, reference: ReferenceStyleEpochs, repeats: int) -> None:
    """epoch.pipeline / epoch.reference_style seconds, their ratio, and the per-phase profile.

    Both start from the same checkpoint, use the same references, settings and batch, and run
    `repeats` consecutive epochs; epoch k of one is compared with epoch k of the other."""
    pipeline, phases, tokens = [], [], []
    for epoch in range(1, repeats + 1):
        elapsed, record = timed(lambda: loop.run_epoch(epoch))
        pipeline.append(elapsed)
        phases.append(record.seconds)
        tokens.append(record.generated_tokens)
    baseline, baseline_phases, baseline_tokens = [], [], []
    for epoch in range(1, repeats + 1):
        elapsed, result = timed(lambda: reference.run_epoch(epoch))
        baseline.append(elapsed)
        baseline_phases.append(result["seconds"])
        baseline_tokens.append(result["generated_tokens"])
    questions, n = len(loop.questions), loop.settings.num_samples
    what = f"{questions} forget questions x n={n}"
    report.add("epoch.pipeline.seconds", "s", pipeline, f"{what}: vLLM + reward + ZeRO-3 + weight push")
    report.add("epoch.reference_style.seconds", "s", baseline, f"{what}: HF generate inside each training step")
    report.add_ratio("epoch.speedup", "epoch.reference_style.seconds", "epoch.pipeline.seconds",
                     "reference-style seconds / pipeline seconds, same epoch index")
    report.add("epoch.pipeline.generated_tokens", "tokens", tokens)
    report.add("epoch.reference_style.generated_tokens", "tokens", baseline_tokens)
    report.profile["pipeline_epoch"] = _phase_profile(phases, pipeline)
    report.profile["reference_style_epoch"] = _phase_profile(baseline_phases, baseline)


def _phase_profile(per_epoch: Sequence[dict[str, float]], totals: Sequence[float]) -> dict[str, Any]:
    """Median seconds and share of the epoch per phase; 'other' is what no phase timer covers."""
    total = statistics.median(totals)
    profile = {phase: statistics.median(p[phase] for p in per_epoch) for phase in per_epoch[0]}
    # per epoch first: medians of the parts need not add up to the median of the whole
    profile["other"] = statistics.median(max(0.0, t - sum(p.values())) for p, t in zip(per_epoch, totals))
    return {"median_epoch_seconds": total,
            "phases": {k: {"seconds": v, "share": v / total if total else 0.0} for k, v in profile.items()}}


def add_push_share(report: BenchReport) -> None:
    """weight_push.share_of_epoch: push seconds / pipeline epoch seconds (when both were measured)."""
    if "weight_push.seconds" in report.figures and "epoch.pipeline.seconds" in report.figures:
        epoch = statistics.median(report.figures["epoch.pipeline.seconds"].values)
        report.add("weight_push.share_of_epoch", "fraction",
                   [s / epoch for s in report.figures["weight_push.seconds"].values],
                   "each push over the median pipeline epoch")
