"""The pipeline's own figures: ZeRO-3 trainer throughput and memory, weight push, and PMC epochs
(overlapped and sequential chunks vs reference-style, at several numbers of forget questions) with a
per-phase profile, a scaling plot and epoch timelines."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from pmc_pipeline.bench.figures import BenchReport, timed
from pmc_pipeline.bench.reference_epoch import ReferenceStyleEpochs
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.eval.plots import draw_timeline
from pmc_pipeline.method.epoch_record import EpochRecord
from pmc_pipeline.method.loop import PMCLoop, reference_answers
from pmc_pipeline.schema import UnlearnConfig
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
        seconds, _ = timed(lambda: trainer.train_batches(batches, role_weights))
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


SCHEDULES = ("overlapped", "sequential", "reference_style")


@dataclass
class EpochSetup:
    """What the epoch section runs on: the session's engine and a trainer group holding the checkpoint,
    the unlearn config of the demo, its retain examples, and where to keep the trainer's start state."""

    cfg: UnlearnConfig
    rollout: Any
    trainer: Any
    formatter: PromptFormatter
    retain: list[TrainExample]
    model_dir: str
    hf_threads: int
    state_dir: Path


def bench_epochs(report: BenchReport, setup: EpochSetup, question_pool: Sequence[str], counts: Sequence[int],
                 repeats: int, out: Path) -> None:
    """For each number of forget questions: `repeats` epochs of each schedule, all from the same start
    (trainer state restored and pushed, same references, settings and seed); epoch k is compared with
    epoch k. Figures epoch.q<count>.<schedule>.seconds and their ratios; the per-phase profile; the
    scaling table and plot (epoch_scaling.png) and the timelines of the largest count (timeline.png)."""
    setup.trainer.save_state(str(setup.state_dir))
    timelines: list[tuple[str, list]] = []
    scaling = []
    for count in counts:
        questions = list(question_pool[:count])
        _restore(setup)
        references = reference_answers(setup.rollout, setup.formatter, questions, setup.cfg.pmc.reference_max_tokens)
        seconds: dict[str, list[float]] = {}
        for schedule in SCHEDULES:
            seconds[schedule], phases, records = _run_schedule(setup, schedule, questions, references, repeats)
            report.profile[f"epoch_q{count}_{schedule}"] = _phase_profile(phases, seconds[schedule])
            if count == counts[-1] and records:
                timelines += [(f"{schedule}, epoch {r.epoch}", [tuple(span) for span in r.extra["timeline"]])
                              for r in records]
            what = f"{count} forget questions x n={setup.cfg.sampling.num_samples}: " + SCHEDULE_NOTES[schedule]
            report.add(f"epoch.q{count}.{schedule}.seconds", "s", seconds[schedule], what)
        name = f"epoch.q{count}"
        report.add_ratio(f"{name}.speedup", f"{name}.reference_style.seconds", f"{name}.overlapped.seconds",
                         "reference-style seconds / overlapped seconds, same epoch index")
        report.add_ratio(f"{name}.overlap_gain", f"{name}.sequential.seconds", f"{name}.overlapped.seconds",
                         "sequential chunks / overlapped chunks, same epoch index")
        scaling.append({"questions": count, **{s: statistics.median(seconds[s]) for s in SCHEDULES}})
    report.profile["epoch_scaling"] = scaling
    _plot_scaling(scaling, out / "epoch_scaling.png")
    draw_timeline(timelines, out / "timeline.png", f"{counts[-1]} forget questions: pipeline epochs, overlapped "
                  "and sequential")


SCHEDULE_NOTES = {
    "overlapped": "vLLM samples chunk k+1 while ZeRO-3 trains chunk k, then one weight push",
    "sequential": "the same chunks one after the other (every chunk sampled, then each trained), then one push",
    "reference_style": "HF generate inside each training step, one process",
}


def _restore(setup: EpochSetup) -> None:
    """The trainer back at its start state, and the engines holding the same weights."""
    setup.trainer.load_state(str(setup.state_dir))
    setup.trainer.push_weights()


def _run_schedule(setup: EpochSetup, schedule: str, questions: list[str], references: list[str],
                  repeats: int) -> tuple[list[float], list[dict[str, float]], list[EpochRecord]]:
    """Seconds and phase seconds of each of `repeats` consecutive epochs from the start state."""
    seconds, phases, records = [], [], []
    if schedule == "reference_style":
        reference = ReferenceStyleEpochs(setup.model_dir, setup.cfg, setup.formatter, questions, references,
                                         setup.retain, setup.hf_threads)
        for epoch in range(1, repeats + 1):
            elapsed, result = timed(lambda: reference.run_epoch(epoch))
            seconds.append(elapsed)
            phases.append(result["seconds"])
        return seconds, phases, records
    _restore(setup)
    cfg = replace(setup.cfg, pmc=replace(setup.cfg.pmc, overlap=schedule == "overlapped"))
    loop = PMCLoop(cfg, setup.rollout, setup.trainer, setup.formatter, questions, setup.retain, references)
    for epoch in range(1, repeats + 1):
        elapsed, record = timed(lambda: loop.run_epoch(epoch))
        seconds.append(elapsed)
        phases.append({k: v for k, v in record.seconds.items() if k != "epoch"})
        records.append(record)
    return seconds, phases, records


def _plot_scaling(scaling: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    counts = [row["questions"] for row in scaling]
    for schedule in SCHEDULES:
        ax.plot(counts, [row[schedule] for row in scaling], marker="o", label=schedule.replace("_", "-"))
    ax.set_xlabel("forget questions per epoch")
    ax.set_ylabel("seconds per epoch (median)")
    ax.set_title("PMC epoch time by schedule")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _phase_profile(per_epoch: Sequence[dict[str, float]], totals: Sequence[float]) -> dict[str, Any]:
    """Median seconds and share of the epoch per phase; 'other' is what no phase timer covers."""
    total = statistics.median(totals)
    profile = {phase: statistics.median(p[phase] for p in per_epoch) for phase in per_epoch[0]}
    # per epoch first: medians of the parts need not add up to the median of the whole
    profile["other"] = statistics.median(max(0.0, t - sum(p.values())) for p, t in zip(per_epoch, totals))
    return {"median_epoch_seconds": total,
            "phases": {k: {"seconds": v, "share": v / total if total else 0.0} for k, v in profile.items()}}


def add_push_share(report: BenchReport, count: int) -> None:
    """weight_push.share_of_epoch: push seconds / overlapped epoch seconds (when both were measured)."""
    epoch_figure = f"epoch.q{count}.overlapped.seconds"
    if "weight_push.seconds" in report.figures and epoch_figure in report.figures:
        epoch = statistics.median(report.figures[epoch_figure].values)
        report.add("weight_push.share_of_epoch", "fraction",
                   [s / epoch for s in report.figures["weight_push.seconds"].values],
                   f"each push over the median overlapped epoch of {count} questions")
