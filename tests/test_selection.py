"""Winner selection: argmax and Bradley-Terry sampling (seeded, tau -> 0 equals argmax)."""

from __future__ import annotations

import numpy as np
import pytest

from pmc_pipeline.method.selection import (Selection, below_best, bradley_terry_probabilities, select, select_argmax,
                                           select_bradley_terry)


def _rewards(seed: int = 0, questions: int = 50, n: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).random((questions, n))


def test_bradley_terry_is_reproducible_with_a_fixed_seed():
    rewards = _rewards()
    first = select_bradley_terry(rewards, 0.5, np.random.default_rng(7))
    again = select_bradley_terry(rewards, 0.5, np.random.default_rng(7))
    other = select_bradley_terry(rewards, 0.5, np.random.default_rng(8))
    assert np.array_equal(first.index, again.index)
    assert not np.array_equal(first.index, other.index)
    assert np.array_equal(first.reward, rewards[np.arange(len(rewards)), first.index])


def test_tau_to_zero_equals_argmax():
    rewards = _rewards(1)
    argmax = select_argmax(rewards)
    for tau in (1e-4, 1e-6):
        picks = select_bradley_terry(rewards, tau, np.random.default_rng(0))
        assert np.array_equal(picks.index, argmax.index)
    # tau == 0 is argmax exactly, ties to the first drawn included
    tied = np.array([[0.2, 0.9, 0.9, 0.1], [0.5, 0.5, 0.5, 0.5]])
    assert list(select(tied, "bradley_terry", 0.0, np.random.default_rng(0)).index) == [1, 0]


def test_bradley_terry_frequencies_follow_the_softmax():
    rewards = np.tile(np.array([[0.0, 0.5, 1.0]]), (20_000, 1))
    picks = select_bradley_terry(rewards, 0.5, np.random.default_rng(3)).index
    expected = bradley_terry_probabilities(rewards[:1], 0.5)[0]
    assert np.allclose(np.bincount(picks, minlength=3) / len(picks), expected, atol=0.015)
    # a large tau is close to uniform, unlike argmax
    flat = select_bradley_terry(rewards, 100.0, np.random.default_rng(3)).index
    assert np.allclose(np.bincount(flat, minlength=3) / len(flat), 1 / 3, atol=0.02)


def test_below_best_marks_bradley_terry_draws_that_argmax_never_makes():
    rewards = _rewards(2)  # random floats: no ties, so "below the best" is "not the argmax sample"
    assert not below_best(rewards, select_argmax(rewards)).any()
    drawn = select_bradley_terry(rewards, 1.0, np.random.default_rng(0))
    flags = below_best(rewards, drawn)
    assert flags.any() and np.array_equal(flags, drawn.index != np.argmax(rewards, axis=1))
    # a tie with the best is not below it, whichever of the tied samples was drawn
    tied = np.array([[0.2, 0.9, 0.9]])
    assert not below_best(tied, Selection(np.array([2]), np.array([0.9]), np.array([False]))).any()


def test_degenerate_questions_are_flagged_by_both_modes():
    rewards = np.array([[0.0, 0.0], [0.0, 0.4]])
    for mode in ("argmax", "bradley_terry"):
        chosen = select(rewards, mode, 0.3, np.random.default_rng(0))
        assert list(chosen.degenerate) == [True, False]


def test_bad_selection_settings_fail():
    with pytest.raises(ValueError, match="tau"):
        bradley_terry_probabilities(np.ones((1, 2)), -1.0)
    with pytest.raises(ValueError, match="unknown selection"):
        select(np.ones((1, 2)), "best")
