"""Evaluation: TOFU metrics, attacks, probability probes, plots."""
