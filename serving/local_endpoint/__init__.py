"""The local endpoint: the real Triton in SageMaker multi-model mode behind a small front that
speaks SageMaker Runtime's InvokeEndpoint API, so an unmodified boto3 ``sagemaker-runtime``
client with ``endpoint_url`` set works against it as against AWS.

    python -m serving.local_endpoint [--port 8080] [--model-store build/model-store | s3://b/p] ...

Modules: ``server`` (LocalEndpoint, settings, InvokeEndpoint), ``front`` (the HTTP front:
Starlette routes under uvicorn), ``registry`` (load once, LRU eviction, failures remembered),
``store`` (folder or S3 prefix), ``cache`` (safe extraction), ``triton`` (tritonserver and the
MME container API), ``errors`` (SageMaker error shapes).
"""

from .errors import (
    EndpointError,
    InternalFailure,
    ModelError,
    ModelNotReady,
    ValidationError,
)
from .registry import Limits, ModelRegistry, State
from .server import MAX_REQUEST_BYTES, EndpointSettings, LocalEndpoint
from .store import LocalStore, S3Store, build_missing_archives, open_store

__all__ = [
    "MAX_REQUEST_BYTES",
    "EndpointError",
    "EndpointSettings",
    "InternalFailure",
    "Limits",
    "LocalEndpoint",
    "LocalStore",
    "ModelError",
    "ModelNotReady",
    "ModelRegistry",
    "S3Store",
    "State",
    "ValidationError",
    "build_missing_archives",
    "open_store",
]
