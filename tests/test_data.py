"""Data loading: TOFU splits from a local folder, user files in four formats, clear errors."""

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pmc_pipeline.data.demo_authors import generate_demo_data
from pmc_pipeline.data.qa import load_forget_set, load_qa_set, load_rows
from pmc_pipeline.errors import DataError
from pmc_pipeline.schema import DataConfig


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def test_tofu_splits_load_from_a_local_folder(tofu_dir):
    cfg = data_cfg(tofu_dir=str(tofu_dir))
    forget = load_forget_set("forget10", cfg).questions
    retain = load_qa_set("retain90", cfg, "data.train").pairs
    assert len(forget) == 400 and len(retain) == 3600
    assert all(isinstance(q, str) and q.endswith("?") for q in forget[:20])


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_user_files_with_custom_columns(tmp_path, suffix):
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(5)]
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_qa_set(str(path), data_cfg(question_key="q", answer_key="a"), "data.train").pairs
    assert [(p.question, p.answer) for p in pairs] == [(r["q"], r["a"]) for r in rows]


def test_forget_set_may_be_questions_only(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text('{"question": "Who is X?"}\n{"question": "Where is Y?"}\n')
    assert load_forget_set(str(path), data_cfg()).questions == ["Who is X?", "Where is Y?"]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nothere.json"):
        load_qa_set(str(tmp_path / "nothere.json"), data_cfg(), "data.train")


def test_missing_column_names_the_column_and_the_setting(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "x", "answer": "y"}\n')
    with pytest.raises(DataError, match="column 'question' not found .*prompt.*data.question_key"):
        load_qa_set(str(path), data_cfg(), "data.train")


def test_empty_forget_set_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty.jsonl has no rows"):
        load_forget_set(str(path), data_cfg()).questions


def test_unknown_tofu_split_lists_the_available_ones(tofu_dir):
    with pytest.raises(DataError, match="split 'forget77' not found .*forget10"):
        load_forget_set("forget77", data_cfg(tofu_dir=str(tofu_dir)))


def test_demo_data_has_splits_paraphrases_and_key_facts(tmp_path):
    out = generate_demo_data(tmp_path / "demo", num_authors=10, num_forget_authors=2, seed=1)
    cfg = data_cfg(tofu_dir=str(out))
    forget = load_rows("forget", cfg.tofu_dir).rows
    retain = load_qa_set("retain", cfg, "data.train").pairs
    full = load_qa_set("full", cfg, "data.train").pairs
    assert (len(forget), len(retain), len(full)) == (12, 48, 60)
    assert all(row["key_fact"] in row["answer"] and row["key_fact"] in row["paraphrased_answer"] for row in forget)
    assert all(row["paraphrased_question"] != row["question"] for row in forget)
    forget_questions = {row["question"] for row in forget}
    assert not forget_questions & {p.question for p in retain}
