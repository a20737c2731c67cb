"""Serving: the model path, from a request to a pipeline.

`sdserve/` is the model runtime the model.py files share (imported only as `sdserve`; each model
archive carries the modules its model imports), `models/` the Triton model repository with configs
derived from the model table (`derived`), `weights` the tiny and real weights, `archive` the model
archive format, `local_triton` (with `triton_install`) a real Triton from the nvidia-pytriton wheel,
`local_endpoint/` the local SageMaker-compatible multi-model endpoint in front of it, and
`processes` the process helpers every room shares.
"""
