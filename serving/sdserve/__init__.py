"""Shared logic of the Triton model.py files: request validation, batching, pipelines."""
