"""Helpers for tests, benchmarks and demos (never used by the pipeline or the service)."""
