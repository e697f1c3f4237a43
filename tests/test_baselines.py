"""The six baselines' losses on hand-made log-probs, against independent computations in plain Python,
and told apart from their plausible wrong variants."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pmc_pipeline.errors import ConfigError
from pmc_pipeline.method.baselines import BASELINES, AnswerScores, idk_targets, resolve_baseline

# two rows of different lengths: sums and token means disagree, so a length mistake shows
TOKENS = [[-0.5, -1.5, -1.0], [-2.0, -0.25]]
REFERENCE = [-2.5, -2.75]  # summed log-probs under the starting model
REFUSAL_TOKENS = [[-3.0, -1.0], [-0.5, -0.5, -2.0, -1.0]]
REFUSAL_REFERENCE = [-4.0, -3.0]


def scores(rows: list[list[float]], reference: list[float] | None = None, grad: bool = False) -> AnswerScores:
    width = max(map(len, rows))
    values = torch.tensor([row + [0.0] * (width - len(row)) for row in rows], dtype=torch.float64,
                          requires_grad=grad)
    mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows])
    return AnswerScores(values, mask, None if reference is None else torch.tensor(reference, dtype=torch.float64))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def loss(name: str, rows: dict[str, AnswerScores], retain=None, lambda_retain=None, **params) -> float:
    return float(BASELINES[name].loss(rows, retain, lambda_retain, **params))


def test_ga_and_gd_ascend_the_forget_nll_as_a_token_mean():
    tokens = [t for row in TOKENS for t in row]
    nll = -sum(tokens) / len(tokens)
    assert loss("ga", {"forget": scores(TOKENS)}) == pytest.approx(-nll)  # minimising it raises the NLL
    assert loss("ga", {"forget": scores(TOKENS)}) != pytest.approx(-(sum(-sum(r) / len(r) for r in TOKENS) / 2))
    forget = scores(TOKENS, grad=True)
    BASELINES["ga"].loss({"forget": forget}, None).backward()
    assert bool((forget.token_logprobs.grad[forget.mask] > 0).all())  # descent lowers every forget log-prob
    retain = torch.tensor(0.8, dtype=torch.float64)
    assert loss("ga", {"forget": scores(TOKENS)}, retain) == pytest.approx(-nll)  # GA: no retain term
    assert loss("gd", {"forget": scores(TOKENS)}, retain) == pytest.approx(-nll + 1.0 * 0.8)
    assert loss("gd", {"forget": scores(TOKENS)}, retain, lambda_retain=3.0) == pytest.approx(-nll + 3.0 * 0.8)


def test_npo_uses_sequence_sums_against_the_reference_with_two_over_beta():
    beta = BASELINES["npo"].params["beta"]
    assert beta == 0.05 and BASELINES["npo"].lambda_retain == 1.5  # the paper's Appendix B
    sums = [sum(row) for row in TOKENS]
    expected = (2 / beta) * sum(math.log1p(math.exp(beta * (s - r))) for s, r in zip(sums, REFERENCE)) / 2
    got = loss("npo", {"forget": scores(TOKENS, REFERENCE)})
    assert got == pytest.approx(expected)
    means = [sum(row) / len(row) for row in TOKENS]  # the wrong variant: token means
    assert got != pytest.approx((2 / beta) * sum(math.log1p(math.exp(beta * (m - r))) for m, r in zip(means, REFERENCE)) / 2)
    assert got != pytest.approx(expected * beta / 2)  # without the 2 / beta prefactor
    # at the start the model is its own reference: (2 / beta) log 2 exactly
    assert loss("npo", {"forget": scores(TOKENS, sums)}) == pytest.approx((2 / beta) * math.log(2))
    with pytest.raises(ValueError, match="reference_sums are missing"):
        loss("npo", {"forget": scores(TOKENS)})


def test_simnpo_normalises_by_length_and_puts_the_margin_outside_beta():
    beta, delta = 4.0, 0.3
    means = [sum(row) / len(row) for row in TOKENS]
    expected = -(2 / beta) * sum(log_sigmoid(-beta * m - delta) for m in means) / 2
    got = loss("simnpo", {"forget": scores(TOKENS)}, beta=beta, delta=delta)
    assert got == pytest.approx(expected)
    sums = [sum(row) for row in TOKENS]
    assert got != pytest.approx(-(2 / beta) * sum(log_sigmoid(-beta * s - delta) for s in sums) / 2)  # unnormalised
    assert got != pytest.approx(-(2 / beta) * sum(log_sigmoid(-beta * (m + delta)) for m in means) / 2)  # beta*delta
    assert got != pytest.approx(-(2 / beta) * sum(log_sigmoid(-beta * m) for m in means) / 2)  # margin dropped
    assert BASELINES["simnpo"].params == {"beta": 4.0, "delta": 0.0} and not BASELINES["simnpo"].needs_reference


def test_dpo_prefers_the_refusal_to_the_true_answer():
    beta = 0.1
    winner = [sum(row) - r for row, r in zip(REFUSAL_TOKENS, REFUSAL_REFERENCE)]
    loser = [sum(row) - r for row, r in zip(TOKENS, REFERENCE)]
    expected = -(2 / beta) * sum(log_sigmoid(beta * (w - l)) for w, l in zip(winner, loser)) / 2
    rows = {"refusals": scores(REFUSAL_TOKENS, REFUSAL_REFERENCE), "forget": scores(TOKENS, REFERENCE)}
    got = loss("dpo", rows)
    assert got == pytest.approx(expected)
    assert got != pytest.approx(-(2 / beta) * sum(log_sigmoid(beta * (l - w)) for w, l in zip(winner, loser)) / 2)
    assert got != pytest.approx(expected * beta / 2)
    # descent raises the refusal's log-probs and lowers the true answer's
    refusals, forget = scores(REFUSAL_TOKENS, REFUSAL_REFERENCE, grad=True), scores(TOKENS, REFERENCE, grad=True)
    BASELINES["dpo"].loss({"refusals": refusals, "forget": forget}, None).backward()
    assert bool((refusals.token_logprobs.grad[refusals.mask] < 0).all())
    assert bool((forget.token_logprobs.grad[forget.mask] > 0).all())
    with pytest.raises(ValueError, match="pairs row by row"):
        loss("dpo", {"refusals": scores(REFUSAL_TOKENS[:1], REFUSAL_REFERENCE[:1]), "forget": scores(TOKENS, REFERENCE)})


def test_idk_trains_on_refusal_lines_never_on_the_answers():
    questions = [f"Who wrote book {i}?" for i in range(20)]
    refusals = ["I don't know.", "I have no information on that."]
    pairs = idk_targets(questions, refusals, random.Random(0))
    assert [q for q, _ in pairs] == questions and {a for _, a in pairs} == set(refusals)  # both lines drawn
    assert idk_targets(questions, refusals, random.Random(0)) == pairs  # seeded
    tokens = [t for row in REFUSAL_TOKENS for t in row]
    assert loss("idk", {"refusals": scores(REFUSAL_TOKENS)}) == pytest.approx(-sum(tokens) / len(tokens))
    assert not BASELINES["idk"].trains_on_forget_answers
    assert all(BASELINES[name].trains_on_forget_answers for name in ("ga", "gd", "dpo", "npo", "simnpo"))
    with pytest.raises(ValueError, match="reads rows"):
        loss("idk", {"forget": scores(TOKENS)})


def test_registry_names_and_settings_fail_in_one_line():
    assert set(BASELINES) == {"ga", "gd", "idk", "dpo", "npo", "simnpo"}
    with pytest.raises(ConfigError, match="unknown baseline 'rmu'; choose one of: ga, gd"):
        resolve_baseline("rmu")
    with pytest.raises(ConfigError, match=r"baseline npo: unknown setting\(s\) \['gamma'\]"):
        loss("npo", {"forget": scores(TOKENS, REFERENCE)}, gamma=1.0)


def _kl_by_hand(ref_logits: list[float], logits: list[float]) -> float:
    """KL(p_ref || p) of one position, from softmaxes in plain Python."""
    def softmax(xs):
        top = max(xs)
        exps = [math.exp(x - top) for x in xs]
        return [e / sum(exps) for e in exps]

    p_ref, p = softmax(ref_logits), softmax(logits)
    return sum(r * math.log(r / q) for r, q in zip(p_ref, p))


def test_the_kl_retain_term_is_the_forward_kl_averaged_over_answer_tokens_only():
    """retain_loss: kl. KL(starting model || model) at each position that predicts an answer token, averaged
    over those tokens: not the reverse KL, and not OpenUnlearning's unmasked form (prompt and padding
    positions counted too), which changes with the batch's padding."""
    from trainer.loss import IGNORE_INDEX, role_weighted_loss, token_kl

    torch.manual_seed(0)
    logits, reference = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    # row 0: prompt of 2 tokens, 3 answer tokens; row 1: prompt of 1, 2 answer tokens, 2 of padding
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, 0, 3, IGNORE_INDEX, IGNORE_INDEX]])
    per_position = token_kl(logits, reference)
    by_hand = [[_kl_by_hand(reference[r, t].tolist(), logits[r, t].tolist()) for t in range(4)] for r in range(2)]
    assert per_position.flatten().tolist() == pytest.approx([v for row in by_hand for v in row], abs=1e-6)
    answer_positions = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]  # logits at t predict labels at t + 1
    masked = sum(by_hand[r][t] for r, t in answer_positions) / len(answer_positions)
    term, per_role = role_weighted_loss(logits, labels, ["retain", "retain"], {"retain": 1.0}, 0.0, per_position,
                                        ("retain",))
    assert float(term) == pytest.approx(masked, abs=1e-6) and per_role["retain"][1] == 5
    unmasked = sum(map(sum, by_hand)) / 2  # F.kl_div(..., reduction="batchmean") over every position
    reverse = sum(_kl_by_hand(logits[r, t].tolist(), reference[r, t].tolist()) for r, t in answer_positions) / 5
    assert abs(masked - unmasked) > 0.1 and abs(masked - reverse) > 0.01
    # the same model as the reference: no KL; the NLL path is untouched without kl_roles
    assert float(token_kl(logits, logits).abs().max()) < 1e-9
    nll, _ = role_weighted_loss(logits, labels, ["retain", "retain"], {"retain": 1.0}, 0.0, per_position)
    assert abs(float(nll) - float(term)) > 0.1


def test_a_baseline_with_the_kl_retain_term_reads_it_and_refuses_rows_without_it():
    from pmc_pipeline.method.baselines import BaselineObjective

    forget = scores(TOKENS, REFERENCE)
    kl = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    retain = AnswerScores(torch.tensor([[-1.0, -3.0]], dtype=torch.float64), torch.tensor([[True, True]]),
                          token_kl=kl)
    npo = BaselineObjective("npo", 1.5, {}, "kl")({"forget": forget, "retain": retain})
    expected = loss("npo", {"forget": forget}) + 1.5 * 0.375
    assert float(npo) == pytest.approx(expected)
    nll = BaselineObjective("npo", 1.5)({"forget": forget, "retain": retain})
    assert float(nll) == pytest.approx(loss("npo", {"forget": forget}) + 1.5 * 2.0)
    with pytest.raises(ValueError, match="token_kl is missing"):
        BaselineObjective("gd", None, {}, "kl")({"forget": forget, "retain": scores([[-1.0]])})
