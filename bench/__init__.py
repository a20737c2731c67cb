"""Benchmarks and load/fault tools: the one room that drives every other part (serving, studio, deploy)."""
