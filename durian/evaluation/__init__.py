"""Metrics and evaluation sets."""
