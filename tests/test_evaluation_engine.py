"""Evaluation on the session's real vLLM engine: the fine-tuned demo model vs a short PMC run on it.

One module-scoped PMC run (4 epochs, greedy metrics every 2) serves every test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pmc_pipeline.cli import main as pmc_main
from pmc_pipeline.config import from_mapping
from pmc_pipeline.data.eval_splits import MultipleChoiceItem
from pmc_pipeline.eval.attacks import greedy_prefill, sampling_attack
from pmc_pipeline.eval import tofu_metrics
from pmc_pipeline.eval.probes import multiple_choice_leakage
from pmc_pipeline.eval.tofu_standard import EXAMPLES_FILE, score_answers
from pmc_pipeline.recipes.evaluate import EVAL_KEYS, load_evaluate_config, run_evaluation
from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning
from pmc_pipeline.runtime.session import PipelineSession

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(1)]
K = 12


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _unlearn_cfg(run_dir: Path, demo_data_dir: Path, model: Path, **pmc):
    return from_mapping("unlearn", {
        "seed": 0, "data": {"tofu_dir": str(demo_data_dir), "retain": "retain", "forget": "forget"},
        "model": {"path": str(model)}, "run_dir": str(run_dir),
        "trainer": {"learning_rate": 1e-3, "batch_size": 4, "max_length": 128, "torch_threads": 1},
        "sampling": {"num_samples": 4, "temperature": 1.0, "top_p": 0.95, "max_tokens": 32},
        "pmc": {"epochs": 4, "lambda_retain": 1.0, "min_len": 3, "reference_max_tokens": 32, **pmc},
        "evaluation": {"eval_every": 2, "max_tokens": 32, "retain_split_for_eval": "retain"},
        "rollout": {"max_model_len": 512}})


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory, lent, demo_data_dir, finetuned_demo_model):
    root = tmp_path_factory.mktemp("eval-run")
    cfg = _unlearn_cfg(root / "run", demo_data_dir, finetuned_demo_model)
    session = PipelineSession(**lent)
    inputs = check_unlearn(cfg)
    result = run_unlearning(cfg, session, inputs)
    forget = _rows(demo_data_dir / "forget.json")
    return {"result": result, "session": session, "formatter": inputs.formatter, "forget": forget,
            "finetuned": finetuned_demo_model, "root": root, "rollout": session.rollout(str(result.checkpoint), None, "float32", 0)}


def _attack(run, checkpoint, seed=0):
    run["rollout"].load_checkpoint(str(checkpoint))
    forget = run["forget"]
    return sampling_attack(run["rollout"], run["formatter"], [r["question"] for r in forget],
                           [r["answer"] for r in forget], k=K, max_tokens=32, seed=seed)


def test_sampling_attack_leaks_less_after_unlearning(unlearned):
    before = _attack(unlearned, unlearned["finetuned"])
    after = _attack(unlearned, unlearned["result"].checkpoint)
    assert before.mean_worst_case_recall > 0.8, "the fine-tuned model should leak its memorised answers"
    assert after.mean_worst_case_recall < before.mean_worst_case_recall - 0.2


def test_sampling_attack_draws_k_distinct_reproducible_samples(unlearned):
    first = _attack(unlearned, unlearned["result"].checkpoint, seed=7)
    again = _attack(unlearned, unlearned["result"].checkpoint, seed=7)
    assert [len(r) for r in first.recalls] == [K] * len(unlearned["forget"])
    samples = unlearned["rollout"].sample([unlearned["formatter"].prompt_ids(unlearned["forget"][0]["question"])],
                                          K, 0.9, 0.95, 32, 7)[0]
    assert len(samples) == K and len({c.token_ids for c in samples}) > 1  # not one answer repeated k times
    assert first.recalls == again.recalls and first.worst_samples == again.worst_samples


def test_prefill_is_really_forced(unlearned):
    """The memorised model, forced to start with the first words of its answer, continues after them."""
    unlearned["rollout"].load_checkpoint(str(unlearned["finetuned"]))
    born = [r for r in unlearned["forget"] if r["question"].startswith("Where was")]
    assert born, "the demo forget set should ask where its authors were born"
    for row in born:
        prefix = row["answer"][:row["answer"].index(" in ") + 3]  # "<name> was born in"
        result = greedy_prefill(unlearned["rollout"], unlearned["formatter"], [row["question"]], [row["answer"]],
                                prefix, 16)
        continuation = result.answers[0]
        assert row["key_fact"] in continuation  # the city, right after the forced words
        assert "born" not in continuation  # the prefix is neither regenerated nor part of the scored text


def test_prompt_logprobs_equal_hf_and_mc_probe_prefers_the_memorised_answer(unlearned):
    rollout, formatter = unlearned["rollout"], unlearned["formatter"]
    rollout.load_checkpoint(str(unlearned["finetuned"]))
    ids = list(formatter.example(unlearned["forget"][0]["question"], unlearned["forget"][0]["answer"], "x").input_ids)
    engine = rollout.prompt_logprobs([ids])[0]
    model = AutoModelForCausalLM.from_pretrained(unlearned["finetuned"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    hf = [float(logits[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert engine[0] is None and np.allclose(engine[1:], hf, atol=1e-3)

    # TOFU's per-example values read the answer tokens' log-probs and teacher-forced argmax hits
    rows = unlearned["forget"][:3]
    pairs = [(r["question"], option) for r in rows for option in (r["answer"], r["paraphrased_answer"])]
    scored = score_answers(rollout, formatter, pairs)
    for (question, answer), got in zip(pairs, scored):
        example = formatter.example(question, answer, "x")
        ids = list(example.input_ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        positions = range(example.answer_start, len(ids))
        assert np.allclose(got.logprobs, [float(logits[t - 1, ids[t]]) for t in positions], atol=1e-3)
        assert got.argmax_is_label == [int(logits[t - 1].argmax()) == ids[t] for t in positions]
        assert tofu_metrics.answer_probability(got.logprobs) == pytest.approx(
            float(np.exp(np.mean([float(logits[t - 1, ids[t]]) for t in positions]))), rel=1e-3)
    assert any(got.argmax_is_label) and not all(all(g.argmax_is_label) for g in scored)  # both kinds occur

    # options: the true paraphrased answer vs the same template's answers about the other forget author
    forget = unlearned["forget"]
    items = [MultipleChoiceItem(r["question"], r["paraphrased_answer"],
                                [o["paraphrased_answer"] for o in forget if o["author"] != r["author"]
                                 and o["question"].split()[0:2] == r["question"].split()[0:2]])
             for r in forget]
    probe = multiple_choice_leakage(rollout, formatter, items)
    assert probe["true_most_likely_rate"] > probe["chance_rate"]


def test_the_stopping_rule_ends_the_same_run_at_the_evaluated_epoch_its_threshold_names(unlearned, demo_data_dir):
    """The fixture's run again, with pmc.stop_at_reference_recall set to the drift its epoch 2 measured:
    the same seeded run reaches it there and stops, instead of training to epoch 4."""
    lines = _rows(unlearned["result"].run_dir / "metrics.jsonl")
    at_2, at_4 = (line["drift_reference_recall"] for line in lines if "drift_reference_recall" in line)
    assert at_4 < at_2 < 1.0, "the drift should fall as PMC trains, or this run cannot show where it stops"
    cfg = _unlearn_cfg(unlearned["root"] / "stopped", demo_data_dir, unlearned["finetuned"],
                       stop_at_reference_recall=at_2)
    result = run_unlearning(cfg, unlearned["session"])
    stopped = _rows(result.run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in stopped] == [1, 2]
    assert stopped[-1]["stopped"] == f"drift_reference_recall {at_2:.4f} <= pmc.stop_at_reference_recall {at_2}"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs"], summary["stopped_after_epoch"]) == ("complete", 4, 2)
    assert "stopped by the stopping rule after epoch 2" in (result.checkpoint / "README.md").read_text()
    assert (result.checkpoint / "model.safetensors").is_file()


def test_eval_every_logs_greedy_metrics_and_plots_draw(unlearned, tmp_path):
    run_dir = unlearned["result"].run_dir
    lines = _rows(run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert all("elapsed_seconds" in line for line in lines)
    evaluated = [line for line in lines if "eval_unlearn_quality" in line]
    assert [line["epoch"] for line in evaluated] == [2, 4]
    for line in evaluated:
        assert 0 <= line["eval_unlearn_quality"] <= 100 and 0 <= line["eval_utility"] <= 100
        assert line["eval_forget"] is not None and line["eval_world_facts"] is None
    before = json.loads((run_dir / "eval_before.json").read_text())
    assert before["eval_unlearn_quality"] < lines[-1]["eval_unlearn_quality"]
    assert [line["elapsed_seconds"] for line in lines] == sorted(line["elapsed_seconds"] for line in lines)

    assert pmc_main(["plot", str(run_dir), str(run_dir), f"out={tmp_path / 'plots'}"]) == 0
    for name in ("curves_epoch.png", "curves_time.png", "pareto.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_pmc_evaluate_a_run_dir(unlearned, demo_data_dir, tmp_path):
    run_dir = unlearned["result"].run_dir
    # unrelated sentences that happen to use words of the forget answers (names, cities, titles...)
    facts = [r["key_fact"] for r in unlearned["forget"]]
    text = tmp_path / "unrelated.txt"
    text.write_text(" ".join(f"The weather report mentioned {fact} twice before noon." for fact in facts))
    mc = _mc_file(demo_data_dir, tmp_path / "forget_mc.json")
    perturbed, holdout = _tofu_files(demo_data_dir, tmp_path)
    cfg = load_evaluate_config(str(run_dir), [f"attack.k={K}", "attack.max_tokens=24", "evaluation.max_tokens=24",
                                              f"output_dir={tmp_path / 'eval'}", f"probes.side_effect_text={text}",
                                              f"evaluation.lm_eval_tasks=[tofu_mc:{mc}]", "evaluation.lm_eval_limit=5",
                                              f"evaluation.forget_perturbed={perturbed}", f"evaluation.holdout={holdout}"])
    result = run_evaluation(cfg, unlearned["session"])
    out = tmp_path / "eval"
    results = json.loads((out / "eval.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    assert tuple(sorted(results)) == tuple(sorted(EVAL_KEYS))
    assert settings["checkpoint"] == str(run_dir / "checkpoint-final")
    assert results["world_facts"] is None  # the demo data has none
    # TOFU's standard metrics on the forget split and the holdout; the others are absent from the demo data
    tofu = results["tofu"]
    assert tofu["forget"]["n"] == len(unlearned["forget"]) and 0 < tofu["forget"]["truth_ratio"] <= 1
    assert 0 <= tofu["forget"]["probability"] <= 1 and 0 <= tofu["forget"]["extraction_strength"] <= 1
    assert tofu["retain"] is None and tofu["model_utility"] is None and "retain (split 'retain_perturbed' not found)" \
        in tofu["model_utility_note"]
    assert tofu["forget_quality"] is None and "retain_model_eval" in tofu["forget_quality_note"]
    assert 0 <= tofu["privacy"]["auc"] <= 1 and tofu["privacy"]["privleak"] is None
    examples = _rows(out / EXAMPLES_FILE)
    assert [r["split"] for r in examples].count("forget") == len(unlearned["forget"])
    assert [r["split"] for r in examples].count("holdout") == len(_rows(holdout))
    assert not any(r["answer"] in (out / EXAMPLES_FILE).read_text() for r in unlearned["forget"])
    # the multiple-choice probe read the forget options' scores of that same call
    assert results["mc_leakage"]["questions"] == len(unlearned["forget"])
    assert set(settings["phase_seconds"]) >= {"greedy", "tofu_metrics", "mc_leakage"}
    # the model card `pmc unlearn` wrote now carries this evaluation's numbers, and no forget content
    from huggingface_hub import ModelCard

    card = ModelCard.load(run_dir / "checkpoint-final" / "README.md")
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["unlearn_quality"] == pytest.approx(results["unlearn_quality"]["value"])
    assert values["tofu_forget_truth_ratio"] == pytest.approx(tofu["forget"]["truth_ratio"])
    assert card.data.base_model == str(unlearned["finetuned"])
    assert f"{len(unlearned['forget'])} forget question(s)" in card.text
    assert not any(r["question"] in card.text or r["answer"] in card.text for r in unlearned["forget"])
    assert results["utility"]["from"] == ["retain_short"]
    assert len(results["forget"]["generations"]) == len(unlearned["forget"])
    assert results["sampling_attack"]["k"] == K and len(results["sampling_attack"]["per_question"]) == 12
    assert results["prefill_attack"]["prefix"] == "The answer is:"
    effects = result.side_effects
    assert effects["base"] == str(unlearned["finetuned"]) and effects["occurrences"] > 0
    assert "unlearn quality" in (out / "report.md").read_text()
    assert results["lm_eval"]["tofu_mc_forget_mc"]["n"] == 5 and 0 <= results["lm_eval"]["tofu_mc_forget_mc"]["acc"] <= 1
    assert "lm-eval tofu_mc_forget_mc: acc_norm" in (out / "report.md").read_text()


def _with_other_authors(demo_data_dir: Path, field: str) -> list[tuple[dict, list[str]]]:
    """Each forget row with three other authors' `field` for the same kind of question (the fine-tuned
    model has seen all of them)."""
    by_author: dict[str, list[dict]] = {}
    for row in _rows(demo_data_dir / "full.json"):
        by_author.setdefault(row["author"], []).append(row)
    pairs = []
    for row in _rows(demo_data_dir / "forget.json"):
        kind = [r["question"] for r in by_author[row["author"]]].index(row["question"])
        others = [a for a in sorted(by_author) if a != row["author"]][:3]
        pairs.append((row, [by_author[a][kind][field] for a in others]))
    return pairs


def _tofu_files(demo_data_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The forget split in TOFU's `_perturbed` layout (perturbed answers: the other authors' paraphrased
    answers to the same kind of question), and a holdout: other made-up authors, never trained on."""
    from pmc_pipeline.data.demo_authors import generate_demo_data

    perturbed = [{**row, "perturbed_answer": wrong} for row, wrong in _with_other_authors(demo_data_dir,
                                                                                          "paraphrased_answer")]
    (tmp_path / "forget_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in perturbed))
    seen = {r["question"] for r in _rows(demo_data_dir / "full.json")}
    unseen = [r for r in _rows(generate_demo_data(tmp_path / "other-authors", 4, 1, seed=99) / "full.json")
              if r["question"] not in seen]
    (tmp_path / "holdout.json").write_text("".join(json.dumps(r) + "\n" for r in unseen[:12]))
    return tmp_path / "forget_perturbed.json", tmp_path / "holdout.json"


def _mc_file(demo_data_dir: Path, out: Path) -> Path:
    """A multiple-choice split of the forget questions: the true answer, and as wrong options the
    other authors' answers to the same kind of question."""
    lines = [{"question": row["question"], "answer": row["answer"], "perturbed_answer": wrong}
             for row, wrong in _with_other_authors(demo_data_dir, "answer")]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def _log_likelihood_scores(checkpoint: Path, rows: list[dict]) -> dict[str, float]:
    """acc and acc_norm computed here with plain transformers, the way lm-eval documents its
    multiple-choice scoring: the log-likelihood of " <option>" after "Question: <q>\\nAnswer:" (context
    and option tokenised together, no special tokens); acc_norm divides it by the option's length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    right, right_norm = 0, 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        options = [row["answer"], *row["perturbed_answer"]]
        scores = []
        for option in options:
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + " " + option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(context_ids), len(whole))))
        right += int(max(range(len(options)), key=lambda i: scores[i]) == 0)
        right_norm += int(max(range(len(options)), key=lambda i: scores[i] / len(options[i])) == 0)
    return {"acc": right / len(rows), "acc_norm": right_norm / len(rows)}


def test_lm_eval_on_a_local_task_scores_what_the_model_knows(unlearned, demo_data_dir, tmp_path):
    from types import SimpleNamespace

    from pmc_pipeline.eval.extended_utility import check_lm_eval, run_lm_eval

    mc = _mc_file(demo_data_dir, tmp_path / "forget_mc.json")
    tasks = check_lm_eval([f"tofu_mc:{mc}"], SimpleNamespace(tofu_dir=None, tofu_hub_id="unused"))
    finetuned = unlearned["finetuned"]
    scores = run_lm_eval(str(finetuned), tasks, "float32", "cpu", 0, None)["tofu_mc_forget_mc"]
    assert scores["n"] == 12
    # lm-eval's real code path gives what the documented scoring gives, computed independently here
    assert scores["acc"] == pytest.approx(_log_likelihood_scores(finetuned, _rows(mc))["acc"])
    assert scores["acc_norm"] == pytest.approx(_log_likelihood_scores(finetuned, _rows(mc))["acc_norm"])
    assert scores["acc_norm"] == 1.0  # the fine-tuned model knows every forget answer
