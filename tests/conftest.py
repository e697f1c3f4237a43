"""Session-wide fixtures: one Ray instance, one tiny model, one vLLM engine for the whole test run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TOFU_DIR = SHARED / "data" / "tofu"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM-CPU's own CI switch: an `enforce_eager: false` engine traces with dynamo but runs its graph eagerly
# instead of compiling it with inductor (~45 s an engine here). The tests read back that the setting reached
# vLLM's compilation config; none measures compiled speed.
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def pytest_collection_modifyitems(items: list) -> None:
    """Modules that lend the session's kept trainer ranks (`trainer_world(...)`: the world sizes they run
    at, in order) run grouped by world size: the kept set is replaced only when the size changes (each
    new set costs ~20 s of rank start-up here), not at every module of another size. Modules without the
    mark run first, in file order; a stable sort keeps every module's tests together and in order."""
    def worlds(item) -> tuple[int, ...]:
        marker = item.get_closest_marker("trainer_world")
        return tuple(marker.args) if marker else ()

    items.sort(key=worlds)


@pytest.fixture(scope="session")
def tofu_dir() -> Path:
    if not (TOFU_DIR / "forget10.json").is_file():
        pytest.fail(f"TOFU data not found at {TOFU_DIR}; tests read it from ../shared/data/tofu")
    return TOFU_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tofu_dir) -> Path:
    """A random-init Llama (head_dim 32) with a BPE tokenizer trained on TOFU text."""
    from pmc_pipeline.models.tiny import TinyModelSpec, build_tiny_model

    texts = []
    for split in ("forget10", "retain90"):
        for row in read_jsonl(tofu_dir / f"{split}.json"):
            texts += [f"Question: {row['question']}\nAnswer: {row['answer']}"]
    out = tmp_path_factory.mktemp("models") / "tiny"
    return build_tiny_model(texts, out, TinyModelSpec(vocab_size=1024, seed=0))


@pytest.fixture(scope="session")
def ray_instance(tmp_path_factory):
    """One local Ray instance for the session (loopback only, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=8,  # logical slots: actors time-share the machine's real cores
            include_dashboard=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def rollout_actor(ray_instance, tiny_model_dir):
    """The session's only vLLM engine (a Ray actor) on the tiny model.

    Shared by every test: a test that changes its weights restores them (`load_checkpoint`) before it
    ends, and never leaves the engine broken.
    """
    from rollout.actor import start_rollout_actor, stop_rollout_actor, wait_until_ready
    from rollout.config import RolloutConfig

    actor = start_rollout_actor(RolloutConfig(max_model_len=512), str(tiny_model_dir), "float32", 0, use_gpus=False,
                                transfer_backend="gloo", name="pmc-test-rollout")
    try:
        wait_until_ready(actor)
        yield actor
    finally:
        stop_rollout_actor(actor)


@pytest.fixture(scope="session")
def kept_ranks(ray_instance):
    """Trainer rank processes kept between the session's jobs (as one `pmc` session keeps them between
    its jobs): a test that lends them to its PipelineSession skips the ranks' start-up when the last
    job had the same world size. A rank a test kills is not kept; the next job starts new ones."""
    from trainer.group import KeptRanks

    kept = KeptRanks()
    yield kept
    kept.close()


@pytest.fixture(scope="session")
def lent(rollout_actor, kept_ranks) -> dict:
    """What the test session lends a PipelineSession: `PipelineSession(**lent)`."""
    return {"rollout_actor": rollout_actor, "kept_ranks": kept_ranks}


@pytest.fixture(scope="session")
def pmc_cli(tmp_path_factory):
    """`pmc` command lines, each in its own process forked from one that imported pmc, torch,
    transformers and vLLM once (tests/cli_fork_server.py): the command line as users run it, without
    ~12 s of imports per process."""
    from cli_fork_server import ForkedCLI

    cli = ForkedCLI(tmp_path_factory.mktemp("cli-output"))
    yield cli
    cli.close()


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """Made-up authors (12, of which 2 are the forget set) with paraphrases and key facts."""
    from pmc_pipeline.data.demo_authors import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("demo-data") / "data", num_authors=12,
                              num_forget_authors=2, seed=3)


@pytest.fixture(scope="session")
def finetuned_demo_model(tmp_path_factory, ray_instance, rollout_actor, kept_ranks, tiny_model_dir,
                         demo_data_dir) -> Path:
    """The tiny model fine-tuned (ZeRO-3, world size 1) until it has memorised the demo authors.

    Shared by every test that needs a model that knows its forget set; read-only for them."""
    from pmc_pipeline.config import from_mapping
    from pmc_pipeline.recipes.finetune import run_finetune
    from pmc_pipeline.runtime.session import PipelineSession

    out = tmp_path_factory.mktemp("finetuned") / "model"
    cfg = from_mapping("finetune", {
        "seed": 0, "model": {"path": str(tiny_model_dir)}, "output_dir": str(out), "epochs": 20,
        "data": {"tofu_dir": str(demo_data_dir), "train": "full"},
        "trainer": {"learning_rate": 1e-3, "batch_size": 8, "label_smoothing": 0.1, "max_length": 128,
                    "torch_threads": 1}})
    run_finetune(cfg, PipelineSession(rollout_actor=rollout_actor, kept_ranks=kept_ranks))
    return out
