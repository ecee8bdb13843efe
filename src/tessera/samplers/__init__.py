"""Samplers: inference loops over a generator's one-step forward; no training code here."""
