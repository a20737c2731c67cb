"""Serving: the Triton model repository (`models/`), its configs generated from the model table
and the README table (`derived`), the weights (`weights`), a local Triton (`local_triton`) and a benchmark.

The package the model.py files share lives in `sdserve/` and is imported only as `sdserve`
(installed in editable mode; each model archive carries its own copy beside model.py).
"""
