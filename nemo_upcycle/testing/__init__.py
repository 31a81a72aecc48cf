"""Helpers for running code on several gloo ranks (tests and benchmarks)."""
