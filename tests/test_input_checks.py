"""Inputs checked up front (issue 9): each bad file fails with one message naming the file, row and field."""

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pmc_pipeline.config import from_mapping
from pmc_pipeline.data.qa import load_forget_set, load_qa_set
from pmc_pipeline.errors import ConfigError, DataError
from pmc_pipeline.models.source import validate_model_folder
from pmc_pipeline.recipes.evaluate import check_evaluate
from pmc_pipeline.recipes.finetune import check_finetune
from pmc_pipeline.recipes.unlearn import check_unlearn
from pmc_pipeline.schema import DataConfig

GOOD = {"question": "Who is Ada?", "answer": "A baker."}
LONG_QUESTION = "Who is " + " and ".join(["Ada"] * 200) + "?"


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def error(loader, *args) -> str:
    with pytest.raises(DataError) as caught:
        loader(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- data files ---------------------------------------------------------------------------------------

def test_a_file_that_is_not_utf8_names_the_byte_offset_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    content = b'{"question": "Who?", "answer": "A."}\n{"question": "Caf\xe9?", "answer": "B."}\n'
    path.write_bytes(content)
    message = error(load_qa_set, str(path), data_cfg(), "data.train")
    assert message.startswith(f"{path}: not UTF-8 text: byte 0xe9 at offset {content.index(0xe9)} (line 2)")


def test_a_malformed_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"question": "Who?", "answer": }\n')
    message = error(load_qa_set, str(path), data_cfg(), "data.train")
    assert message.startswith(f"{path}: line 3: not valid JSON")


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    path = jsonl(tmp_path / "list.jsonl", [GOOD, ["Who?", "A."]])
    assert error(load_forget_set, str(path), data_cfg()) == f"{path}: line 2: expected a JSON object, got a list"


@pytest.mark.parametrize("name, write", [
    ("empty.jsonl", lambda p: p.write_text("")),
    ("blank.jsonl", lambda p: p.write_text("\n  \n")),
    ("array.json", lambda p: p.write_text("[]")),
    ("header.csv", lambda p: p.write_text("question,answer\n")),
    ("none.parquet", lambda p: pd.DataFrame({"question": pd.Series([], dtype=str)}).to_parquet(p)),
])
def test_a_file_without_rows_says_so(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    assert error(load_forget_set, str(path), data_cfg()) == f"data.forget {path} has no rows"


@pytest.mark.parametrize("field", ["question", "answer"])
@pytest.mark.parametrize("value, described", [
    (42, "a number (42)"), (None, "null"), (["A."], "a list"), ("  ", "a blank string"),
])
def test_a_value_that_is_not_a_non_empty_string_names_file_line_and_field(tmp_path, field, value, described):
    path = jsonl(tmp_path / "qa.jsonl", [GOOD, GOOD, {**GOOD, field: value}])
    message = error(load_qa_set, str(path), data_cfg(), "data.retain")
    assert message == f"data.retain {path}: line 3: '{field}' is {described}; expected a non-empty string"


def test_a_row_without_the_field_is_named(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [GOOD, {"question": "Who?"}])
    message = error(load_qa_set, str(path), data_cfg(), "data.train")
    assert message == f"data.train {path}: line 2: 'answer' is missing; expected a non-empty string"


def test_a_missing_column_names_the_setting_to_change(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"prompt": "Who?", "answer": "A."}])
    message = error(load_qa_set, str(path), data_cfg(), "data.train")
    assert message == (f"data.train {path}: column 'question' not found (columns: prompt, answer); "
                       "set data.question_key to the right column")
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "Who?", "reply": "A."}])
    assert "set data.answer_key" in error(load_qa_set, str(path), data_cfg(), "data.train")


def test_a_json_file_may_hold_one_array_and_errors_name_the_index(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([GOOD, {"question": "Where?", "answer": "Here."}], indent=2))
    assert [p.question for p in load_qa_set(str(path), data_cfg(), "data.train").pairs] == ["Who is Ada?", "Where?"]
    path.write_text(json.dumps([GOOD, {"question": "Where?", "answer": 7}]))
    message = error(load_qa_set, str(path), data_cfg(), "data.train")
    assert message == f"data.train {path}: index 1: 'answer' is a number (7); expected a non-empty string"


def test_csv_cells_are_text_and_rows_are_named(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\nWhich year?,1984\n"Who, then?",None\n')
    pairs = load_qa_set(str(path), data_cfg(), "data.train").pairs
    assert [(p.question, p.answer) for p in pairs] == [("Which year?", "1984"), ("Who, then?", "None")]
    path.write_text("question,answer\nWhich year?,1984\nWho?,\n")
    message = error(load_qa_set, str(path), data_cfg(), "data.train")
    assert message == f"data.train {path}: row 2: 'answer' is a blank string; expected a non-empty string"


def test_duplicate_forget_questions_are_counted_and_kept(tmp_path, caplog):
    rows = [{"question": q} for q in ["A?", "B?", "A?", "C?", "A?", "B?"]]
    path = jsonl(tmp_path / "forget.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="pmc_pipeline.data.qa"):
        forget = load_forget_set(str(path), data_cfg())
    assert forget.duplicates == 3 and len(forget.questions) == 6
    assert f"data.forget {path}: 3 duplicate questions (kept)" in caplog.text


def test_the_forget_set_never_holds_answers(tofu_dir):
    forget = load_forget_set("forget10", data_cfg(tofu_dir=str(tofu_dir)))
    assert forget.answers is None and forget.pairs == [] and forget.duplicates == 0
    assert forget.positions[:2] == ["line 1", "line 2"]


# -- model folders ------------------------------------------------------------------------------------

@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny model (tests break its files)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def model_error(folder: Path, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_model_folder(str(folder), **kwargs)
    message = str(caught.value)
    assert message.startswith(f"{kwargs.get('setting', 'model.path')} {folder}: ") and "\n" not in message
    return message


def test_an_intact_model_folder_and_a_hub_id_pass(model_copy):
    validate_model_folder(str(model_copy))
    validate_model_folder("some-org/some-model")  # left to the hub loader


def test_a_truncated_safetensors_file_is_named(model_copy):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 1000)
    message = model_error(model_copy)
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    assert message.endswith(f"model.safetensors is truncated (header says {size - header:,} bytes of tensors, "
                            f"file has {size - header - 1000:,})")


def test_a_safetensors_file_cut_inside_its_header_is_named(model_copy):
    weights = model_copy / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(100)
    assert "model.safetensors is truncated or its header is corrupted" in model_error(model_copy)


def test_a_corrupted_safetensors_header_is_named(model_copy):
    weights = model_copy / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.seek(8)
        handle.write(b"\x00garbage")
    assert "model.safetensors has a corrupted header (not JSON" in model_error(model_copy)


def test_a_shard_the_index_names_must_exist(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    message = model_error(model_copy)
    assert message.endswith("model.safetensors.index.json names 1 missing shard(s): model-00002-of-00002.safetensors")


def test_config_json_must_exist_and_be_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in model_error(model_copy)
    (model_copy / "config.json").unlink()
    assert model_error(model_copy).endswith("no config.json (not a Hugging Face model folder)")


def test_an_architecture_vllm_lacks_fails_for_the_engine_but_not_for_finetuning(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    message = model_error(model_copy, setting="probes.side_effect_base")
    assert "config.json architectures NoSuchModelForCausalLM: not a model vLLM" in message
    validate_model_folder(str(model_copy), vllm=False)  # transformers loads it by model_type
    (model_copy / "config.json").write_text(json.dumps({**config, "model_type": "no_such_type"}))
    assert "config.json model_type 'no_such_type': not a causal language model" in model_error(model_copy, vllm=False)


def test_check_unlearn_reports_a_broken_model_before_writing(tmp_path, model_copy):
    with open(model_copy / "model.safetensors", "r+b") as handle:
        handle.truncate(5000)
    forget = jsonl(tmp_path / "forget.jsonl", [{"question": "Who is Ada?"}])
    retain = jsonl(tmp_path / "retain.jsonl", [GOOD])
    cfg = from_mapping("unlearn", {"model": {"path": str(model_copy)}, "run_dir": str(tmp_path / "run"),
                                   "data": {"forget": str(forget), "retain": str(retain)}})
    with pytest.raises(ConfigError, match="model.safetensors is truncated"):
        check_unlearn(cfg)
    assert not (tmp_path / "run").exists()


# -- prompt lengths -----------------------------------------------------------------------------------

def unlearn_cfg(tmp_path, model, forget_rows, retain_rows, **values):
    forget = jsonl(tmp_path / "forget.jsonl", forget_rows)
    retain = jsonl(tmp_path / "retain.jsonl", retain_rows)
    return from_mapping("unlearn", {"model": {"path": str(model)}, "run_dir": str(tmp_path / "run"),
                                    "data": {"forget": str(forget), "retain": str(retain)}, **values})


def test_unlearn_forget_prompts_must_leave_room_for_the_sampled_answer(tmp_path, tiny_model_dir):
    cfg = unlearn_cfg(tmp_path, tiny_model_dir, [{"question": "Who?"}, {"question": LONG_QUESTION}], [GOOD],
                      rollout={"max_model_len": 512}, sampling={"max_tokens": 200},
                      pmc={"reference_max_tokens": 100}, trainer={"max_length": 512})
    with pytest.raises(DataError) as caught:
        check_unlearn(cfg)
    assert str(caught.value).startswith(
        f"data.forget {tmp_path / 'forget.jsonl'}: 1 question has a prompt longer than "
        "rollout.max_model_len - sampling.max_tokens = 312 tokens (longest ")
    assert str(caught.value).endswith(", line 2); raise rollout.max_model_len or lower sampling.max_tokens")
    assert not (tmp_path / "run").exists()


def test_unlearn_retain_prompts_must_leave_room_for_an_answer_token(tmp_path, tiny_model_dir):
    cfg = unlearn_cfg(tmp_path, tiny_model_dir, [{"question": "Who?"}],
                      [GOOD, {"question": LONG_QUESTION, "answer": "A."}, {"question": LONG_QUESTION, "answer": "B."}],
                      trainer={"max_length": 128}, rollout={"max_model_len": 512})
    with pytest.raises(DataError, match=r"^data\.retain .*retain\.jsonl: 2 questions have prompts longer than "
                                        r"trainer\.max_length - 1 = 127 tokens \(longest \d+, line 2\); "
                                        r"raise trainer\.max_length"):
        check_unlearn(cfg)


def test_finetune_prompts_must_fit_trainer_max_length(tmp_path, tiny_model_dir):
    train = jsonl(tmp_path / "train.jsonl", [{"question": LONG_QUESTION, "answer": "A."}, GOOD])
    cfg = from_mapping("finetune", {"model": {"path": str(tiny_model_dir)}, "output_dir": str(tmp_path / "out"),
                                    "data": {"train": str(train)}, "trainer": {"max_length": 64}})
    with pytest.raises(DataError, match=r"^data\.train .*train\.jsonl: 1 question has a prompt longer than "
                                        r"trainer\.max_length - 1 = 63 tokens \(longest \d+, line 1\)"):
        check_finetune(cfg)


def test_evaluate_prompts_must_leave_room_for_the_greedy_and_attack_answers(tmp_path, tiny_model_dir):
    jsonl(tmp_path / "forget.json", [GOOD, {"question": LONG_QUESTION, "answer": "A."}])
    values = {"target": str(tiny_model_dir), "model": {"path": str(tiny_model_dir)},
              "data": {"tofu_dir": str(tmp_path), "forget": "forget"}, "output_dir": str(tmp_path / "out"),
              "rollout": {"max_model_len": 512}, "evaluation": {"max_tokens": 200}}
    forget = tmp_path / "forget.json"
    with pytest.raises(DataError, match=rf"^evaluation forget {forget}: 1 question has a prompt longer than "
                                        r"rollout\.max_model_len - attack\.max_tokens = 262 tokens .*, line 2\)"):
        check_evaluate(from_mapping("evaluate", {**values, "attack": {"max_tokens": 250}}))
    with pytest.raises(DataError, match=r"rollout\.max_model_len - evaluation\.max_tokens = 312 tokens"):
        check_evaluate(from_mapping("evaluate", {**values, "attack": {"sampling": False, "prefill": False}}))
    assert not (tmp_path / "out").exists()
