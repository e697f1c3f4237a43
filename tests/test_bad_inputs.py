"""Bad input, command by command: exit status 2, one line on stderr naming the culprit, no traceback,
nothing left behind, and every folder that was there before byte-for-byte untouched.

Each case runs the real `pmc` command line (`pmc_pipeline.cli.main`, what the console script calls) in
a process of its own, forked from a server that has imported pmc, torch, transformers and vLLM once
(tests/cli_fork_server.py; a fresh interpreter per case cost ~15 s of imports here). The workspace
holds good and bad files (the tiny model, copies of it with broken weights or config, data files
broken in one way each, and a user's folder with content) and is fingerprinted before and after
every case.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir, tofu_dir) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    qa = [{"question": f"Who is author {i}?", "answer": f"Author {i} writes novels."} for i in range(4)]
    write_jsonl(root / "retain.jsonl", qa)
    write_jsonl(root / "forget.jsonl", [{"question": row["question"]} for row in qa[:2]])
    write_jsonl(root / "forget_number.jsonl", [{"question": "Who is Ada?"}, {"question": 42}])
    write_jsonl(root / "forget_list.jsonl", [{"question": ["Who", "is", "Ada?"]}])
    write_jsonl(root / "retain_null_answer.jsonl", [qa[0], {"question": "Who is Bob?", "answer": None}])
    write_jsonl(root / "retain_blank_answer.jsonl", [qa[0], qa[1], {"question": "Who is Bob?", "answer": "  "}])
    write_jsonl(root / "retain_no_answer.jsonl", [{"question": "Who is Bob?", "reply": "A baker."}])
    write_jsonl(root / "train_number_answer.jsonl", [qa[0], {"question": "How old is Bob?", "answer": 41}])
    (root / "broken_line.jsonl").write_text(json.dumps(qa[0]) + "\n{\"question\": \"Who\n" + json.dumps(qa[1]) + "\n")
    (root / "not_utf8.jsonl").write_bytes(json.dumps(qa[0]).encode() + b"\n" + '{"question": "Qui est Zo\u00eb?", "answer": "x"}\n'.encode("latin-1"))
    (root / "empty.jsonl").write_text("")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    write_jsonl(root / "long_question.jsonl", [{"question": "Who is " + "very " * 400 + "old?", "answer": "Bob."}])

    models = root / "models"
    shutil.copytree(tiny_model_dir, models / "good")
    shutil.copytree(tiny_model_dir, models / "truncated")
    weights = models / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(tiny_model_dir, models / "corrupt-header")
    weights = models / "corrupt-header" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"this is not json"
    weights.write_bytes(bytes(data))
    shutil.copytree(tiny_model_dir, models / "unknown-arch")
    config = json.loads((models / "unknown-arch" / "config.json").read_text())
    (models / "unknown-arch" / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    shutil.copytree(tiny_model_dir, models / "no-config")
    (models / "no-config" / "config.json").unlink()

    precious = root / "precious"  # a user's folder: never touched
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    (precious / "sub").mkdir()
    (precious / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    (root / "a_file").write_text("a file, not a folder")

    unfinished = root / "unfinished-run"  # a run dir without checkpoint-final
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    (unfinished / "metrics.jsonl").write_text('{"epoch": 1}\n')
    bad_metrics = root / "bad-metrics-run"
    bad_metrics.mkdir()
    (bad_metrics / "metrics.jsonl").write_text('{"epoch": 1, "eval_unlearn_quality": 50.0}\n{"epoch": 2,\n')
    (root / "tofu").symlink_to(tofu_dir)

    # a folder another sweep made, and one this sweep made in which a user put their own sweep.md
    sweep_grid = [a.format(ws=root) for a in SWEEP[2:-1]]
    for name, grid, products in (("other-sweep", ["pmc.lambda_retain=1.0,3.0"], {}),
                                 ("own-sweep", sweep_grid, {"sweep.md": ["0" * 64]})):
        (root / name).mkdir()
        (root / name / "sweep.yaml").write_text(json.dumps({"config": SWEEP[1], "grid": grid, "seeds": 1,
                                                            "products": products}))
    (root / "own-sweep" / "sweep.md").write_text("my own notes\n")
    return root


def fingerprint(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its bytes (folders as 'dir', links as their target)."""
    result = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            result[relative] = f"link:{path.readlink()}"
        elif path.is_dir():
            result[relative] = "dir"
        else:
            result[relative] = hashlib.sha1(path.read_bytes()).hexdigest()
    return result


# the tiny model has 512 positions; the shipped Phi-1.5 config's engine context is 1024
UNLEARN = ["unlearn", "unlearn/phi-1.5", "model.path={ws}/models/good", "model.dtype=float32",
           "data.forget={ws}/forget.jsonl", "data.retain={ws}/retain.jsonl", "rollout.max_model_len=512",
           "run_dir={ws}/out/run"]
SWEEP = ["sweep", *UNLEARN[1:-1], "pmc.lambda_retain=0.5,2.0", "sweep_dir={ws}/out/sweep"]
FINETUNE = ["finetune", "finetune/phi-1.5", "model.path={ws}/models/good", "model.dtype=float32",
            "data.train={ws}/retain.jsonl", "output_dir={ws}/out/model"]
EVALUATE = ["evaluate", "{ws}/models/good", "data.tofu_dir={ws}/tofu", "rollout.max_model_len=512",
            "output_dir={ws}/out/eval"]
TOFU_REAL = ["tofu-real", "smollm2-pmc", "model={ws}/models/good", "tofu_dir={ws}/tofu", "out_dir={ws}/out/tofu-real"]
ABOVE_POSITIONS = "rollout.max_model_len=1024 is above the model's position limit 512 (max_position_embeddings in "

# case: (command line, what the one line must contain). Later `key=value`s override earlier ones.
CASES: dict[str, tuple[list[str], str]] = {
    # -- finetune
    "finetune: output_dir has content": (FINETUNE + ["output_dir={ws}/precious"],
                                         "output_dir={ws}/precious already exists and is not empty"),
    "finetune: output_dir under a file": (FINETUNE + ["output_dir={ws}/a_file/model"], "{ws}/a_file is a file"),
    "finetune: model folder missing": (FINETUNE + ["model.path={ws}/models/none"], "model.path not found: {ws}/models/none"),
    "finetune: truncated weights": (FINETUNE + ["model.path={ws}/models/truncated"], "model.safetensors is truncated"),
    "finetune: broken JSON line": (FINETUNE + ["data.train={ws}/broken_line.jsonl"], "broken_line.jsonl: line 2: not valid JSON"),
    "finetune: not UTF-8": (FINETUNE + ["data.train={ws}/not_utf8.jsonl"], "not_utf8.jsonl: not UTF-8"),
    "finetune: binary file": (FINETUNE + ["data.train={ws}/binary.jsonl"], "binary.jsonl: "),
    "finetune: empty file": (FINETUNE + ["data.train={ws}/empty.jsonl"], "empty.jsonl has no rows"),
    "finetune: answer is a number": (FINETUNE + ["data.train={ws}/train_number_answer.jsonl"],
                                     "train_number_answer.jsonl: line 2: 'answer' is a number (41); expected a non-empty string"),
    "finetune: prompts longer than max_length": (FINETUNE + ["data.train={ws}/long_question.jsonl", "trainer.max_length=64"],
                                                 "trainer.max_length"),
    "finetune: unknown key": (FINETUNE + ["trainer.lr=0.1"], "unknown config key 'trainer.lr'"),
    "finetune: batch size 0": (FINETUNE + ["trainer.batch_size=0"], "trainer.batch_size=0 is out of range"),
    # -- unlearn
    "unlearn: run_dir has content": (UNLEARN + ["run_dir={ws}/precious"], "run_dir {ws}/precious already exists and is not empty"),
    "unlearn: forget question is a number": (UNLEARN + ["data.forget={ws}/forget_number.jsonl"],
                                             "forget_number.jsonl: line 2: 'question' is a number (42); expected a non-empty string"),
    "unlearn: forget question is a list": (UNLEARN + ["data.forget={ws}/forget_list.jsonl"],
                                           "forget_list.jsonl: line 1: 'question' is a list"),
    "unlearn: retain answer is null": (UNLEARN + ["data.retain={ws}/retain_null_answer.jsonl"],
                                       "retain_null_answer.jsonl: line 2: 'answer' is null"),
    "unlearn: retain answer is blank": (UNLEARN + ["data.retain={ws}/retain_blank_answer.jsonl"],
                                        "retain_blank_answer.jsonl: line 3: 'answer' is"),
    "unlearn: retain lacks the answer column": (UNLEARN + ["data.retain={ws}/retain_no_answer.jsonl"],
                                                "column 'answer' not found"),
    "unlearn: forget file missing": (UNLEARN + ["data.forget={ws}/nothere.jsonl"], "data file not found: {ws}/nothere.jsonl"),
    "unlearn: forget file empty": (UNLEARN + ["data.forget={ws}/empty.jsonl"], "empty.jsonl has no rows"),
    "unlearn: retain not UTF-8": (UNLEARN + ["data.retain={ws}/not_utf8.jsonl"], "not_utf8.jsonl: not UTF-8"),
    "unlearn: truncated weights": (UNLEARN + ["model.path={ws}/models/truncated"], "model.safetensors is truncated"),
    "unlearn: corrupted weights header": (UNLEARN + ["model.path={ws}/models/corrupt-header"],
                                          "model.safetensors has a corrupted header"),
    "unlearn: architecture vLLM lacks": (UNLEARN + ["model.path={ws}/models/unknown-arch"], "NoSuchForCausalLM"),
    "unlearn: model folder without config": (UNLEARN + ["model.path={ws}/models/no-config"], "no config.json"),
    "unlearn: prompts longer than the engine allows": (UNLEARN + ["data.forget={ws}/long_question.jsonl",
                                                                  "trainer.max_length=2048", "rollout.max_model_len=512"],
                                                       "longer than rollout.max_model_len - sampling.max_tokens = 312 tokens"),
    "unlearn: engine context above the model's positions": (UNLEARN + ["rollout.max_model_len=1024"],
                                                           ABOVE_POSITIONS + "{ws}/models/good/config.json)"),
    "unlearn: gguf model": (UNLEARN + ["model.gguf_file=model.gguf"], "model.gguf_file"),
    "unlearn: lr warm-up": (UNLEARN + ["trainer.warmup_ratio=0.1"], "trainer.warmup_ratio=0.1: unlearning trains at a constant learning rate"),
    "unlearn: fractional KV cache": (UNLEARN + ["rollout.cpu_kv_cache_gib=1.5"], "rollout.cpu_kv_cache_gib=1.5: vLLM takes"),
    "unlearn: unknown selection": (UNLEARN + ["pmc.selection=best"], "pmc.selection='best' is not allowed"),
    "unlearn: top_p above 1": (UNLEARN + ["sampling.top_p=1.5"], "sampling.top_p=1.5 is out of range"),
    "unlearn: reward function missing": (UNLEARN + ["pmc.reward=no_such_module.reward"], "no_such_module"),
    "unlearn: resume a folder that is no run": (UNLEARN + ["resume={ws}/precious"], "resume={ws}/precious: not a pmc run directory"),
    "unlearn: config file missing": (["unlearn", "nope.yaml"], "config file not found: nope.yaml"),
    # -- evaluate
    "evaluate: target missing": (["evaluate", "{ws}/nothing-here"], "checkpoint or run dir not found: {ws}/nothing-here"),
    "evaluate: run dir without checkpoint": (["evaluate", "{ws}/unfinished-run"], "has no checkpoint-final/"),
    "evaluate: output_dir has content": (EVALUATE + ["output_dir={ws}/precious"], "output_dir {ws}/precious already exists"),
    "evaluate: truncated weights": (EVALUATE[:1] + ["{ws}/models/truncated"] + EVALUATE[2:], "model.safetensors is truncated"),
    "evaluate: forget split file broken": (EVALUATE + ["evaluation.forget={ws}/broken_line.jsonl"],
                                           "broken_line.jsonl: line 2: not valid JSON"),
    "evaluate: attack k 0": (EVALUATE + ["attack.k=0"], "attack.k=0 is out of range"),
    "evaluate: lm-eval task rows without options": (EVALUATE + ["evaluation.lm_eval_tasks=[tofu_mc:{ws}/retain.jsonl]"],
                                                     "retain.jsonl: line 1: 'perturbed_answer' must be a non-empty string"),
    "evaluate: engine context above the model's positions": (EVALUATE + ["rollout.max_model_len=1024"],
                                                            ABOVE_POSITIONS + "{ws}/models/good/config.json)"),
    # -- sweep
    "sweep: sweep_dir holds a user's files": (SWEEP + ["sweep_dir={ws}/precious"],
                                              "sweep_dir={ws}/precious already exists, is not empty and is not a pmc sweep's"),
    "sweep: sweep_dir holds another sweep": (SWEEP + ["sweep_dir={ws}/other-sweep"],
                                             "sweep_dir={ws}/other-sweep holds another sweep (grid differ"),
    "sweep: a summary file the sweep did not write": (SWEEP + ["sweep_dir={ws}/own-sweep"],
                                                      "{ws}/own-sweep/sweep.md was not written by this sweep"),
    "sweep: engine context above the model's positions": (SWEEP + ["rollout.max_model_len=1024"],
                                                          "trial pmc.lambda_retain=0.5: " + ABOVE_POSITIONS),
    # -- tofu-real
    "tofu-real: engine context above the model's positions": (TOFU_REAL + ["unlearn.rollout.max_model_len=1024"],
                                                              "method pmc: unlearn." + ABOVE_POSITIONS),
    # -- plot
    "plot: no metrics": (["plot", "{ws}/precious"], "no metrics.jsonl"),
    "plot: broken metrics line": (["plot", "{ws}/bad-metrics-run", "out={ws}/out/plots"], "metrics.jsonl: line 2 is not JSON"),
    "plot: out has content": (["plot", "{ws}/bad-metrics-run", "out={ws}/precious"], "out={ws}/precious already exists and is not empty"),
    "plot: unknown option": (["plot", "{ws}/bad-metrics-run", "colour=red"], "unknown option(s) colour"),
    # -- check
    "check: unknown key": (["check", "unlearn/phi-1.5", "pmc.epoch=3"], "unknown config key 'pmc.epoch'"),
    "check: world size 0": (["check", "unlearn/phi-1.5", "trainer.world_size=0"], "trainer.world_size=0 is out of range"),
    "check: unknown engine model implementation": (["check", "unlearn/gemma-3-12b", "rollout.model_impl=fast"],
                                                   "model_impl='fast' is not allowed; choose one of: auto, vllm, "
                                                   "transformers"),
    # -- demo
    "demo: unknown demo": (["demo", "huge"], "unknown demo 'huge'"),
    "demo: too few authors": (["demo", "tiny", "data.num_authors=1"], "data.num_authors=1 is out of range"),
    "demo: engine context above the model's positions": (["demo", "tiny", "unlearn.rollout.max_model_len=1024"],
                                                         "unlearn.rollout.max_model_len=1024 is above the model's "
                                                         "position limit 512 (max_position_embeddings of the demo's"),
    "demo: workdir is a file": (["demo", "tiny", "workdir={ws}/a_file"], "{ws}/a_file is a file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, ws, pmc_cli):
    args, expected = CASES[case]
    before = fingerprint(ws)
    returncode, stdout, stderr = pmc_cli.run([a.format(ws=ws) for a in args], ws)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"pmc {args[0]}: error: "), lines[0]
    assert expected.format(ws=ws) in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr
    assert fingerprint(ws) == before  # nothing written, nothing changed, nothing left behind

