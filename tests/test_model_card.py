"""The checkpoint's model card: Hugging Face metadata that parses back, counts instead of content, and a
user's own README.md left alone."""

from __future__ import annotations

from huggingface_hub import ModelCard

from pmc_pipeline.eval.model_card import CARD, card_text, write_model_card

UNLEARNING = {"forget_split": "forget10", "retain_split": "retain90", "forget_questions": 400, "retain_pairs": 3600,
              "settings": {"pmc.epochs": 10, "pmc.lambda_retain": 1.25}}
RESULTS = {"unlearn_quality": {"value": 88.8}, "utility": {"value": 48.8}, "forget": {"rouge_l_recall": 0.127},
           "tofu": {"forget_quality": None, "model_utility": 0.41, "forget": {"truth_ratio": 0.7}}}


def test_the_card_parses_as_a_hugging_face_card_with_the_evaluation_as_model_index(tmp_path):
    card = ModelCard(card_text("unlearn-llama", "models/finetuned/llama", UNLEARNING, RESULTS))
    assert card.data.base_model == "models/finetuned/llama" and "unlearning" in card.data.tags
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {"unlearn_quality": 88.8, "utility": 48.8, "forget_rouge_l_recall": 0.127,
                      "tofu_model_utility": 0.41, "tofu_forget_truth_ratio": 0.7}  # a null metric is left out
    assert "400 forget question(s) from `forget10`" in card.text and "proves nothing about what the weights" in card.text
    first = ModelCard(card_text("unlearn-llama", "models/finetuned/llama", UNLEARNING))
    assert first.data.eval_results is None and "Not evaluated yet" in first.text


def test_a_readme_the_user_wrote_is_kept(tmp_path):
    checkpoint, fallback = tmp_path / "ckpt", tmp_path / "eval"
    checkpoint.mkdir(), fallback.mkdir()
    text = card_text("m", "base", UNLEARNING, RESULTS)
    assert write_model_card(checkpoint, text) == checkpoint / CARD  # none there: written
    assert write_model_card(checkpoint, text.replace("88.8", "90.0")) == checkpoint / CARD  # pmc's own: updated
    assert "90" in (checkpoint / CARD).read_text()
    (checkpoint / CARD).write_text("# my model\n")
    assert write_model_card(checkpoint, text, fallback_dir=fallback) == fallback / CARD
    assert (checkpoint / CARD).read_text() == "# my model\n" and write_model_card(checkpoint, text) is None
