"""Errors of the local endpoint, answered in the shapes SageMaker Runtime uses.

botocore's rest-json parser takes the error code from the ``x-amzn-ErrorType`` header (the part
before ``:``) and the message from the JSON body's ``message``/``Message``; the modeled members
of an error shape (ModelError's ``OriginalStatusCode``, ``OriginalMessage``, ``LogStreamArn``)
are read from the body under their member names. With those three in place an unmodified boto3
``sagemaker-runtime`` client raises ``client.exceptions.ModelError`` etc. exactly as on AWS
(shapes from botocore's ``data/sagemaker-runtime/2017-05-13/service-2.json``).
"""

from __future__ import annotations

import json
from typing import Any

# What the AWS front sends after the code; botocore keeps only the part before ':'.
ERROR_TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.sagemaker/"
LOCAL_ACCOUNT = "000000000000"  # stands in for the AWS account id in messages and ARNs


class EndpointError(Exception):
    """An error answered to the caller; subclasses fix the SageMaker error code and status."""

    code = "InternalFailure"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def fields(self) -> dict[str, Any]:
        return {}

    def __copy__(self) -> EndpointError:
        # A remembered error is raised again as a copy: one instance raised by many threads
        # would share (and keep growing) one traceback.
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        Exception.__init__(clone, self.message)
        return clone

    def body(self) -> bytes:
        return json.dumps({"Message": self.message, **self.fields()}).encode("utf-8")

    def headers(self) -> dict[str, str]:
        return {"x-amzn-ErrorType": self.code + ERROR_TYPE_SUFFIX, "Content-Type": "application/json"}


class ValidationError(EndpointError):
    """400: the request (endpoint name, target model, body, headers) is not acceptable."""

    code = "ValidationError"
    status = 400


class ModelError(EndpointError):
    """424: the model answered 4xx/5xx (or could not be loaded, or crashed)."""

    code = "ModelError"
    status = 424

    def __init__(self, message: str, *, original_status: int, original_message: str,
                 log_stream_arn: str = "") -> None:
        super().__init__(message)
        self.original_status = original_status
        self.original_message = original_message
        self.log_stream_arn = log_stream_arn

    def fields(self) -> dict[str, Any]:
        kind = "CLIENT_ERROR_FROM_MODEL" if 400 <= self.original_status < 500 else "SERVER_ERROR_FROM_MODEL"
        fields: dict[str, Any] = {"ErrorCode": kind, "OriginalStatusCode": self.original_status,
                                  "OriginalMessage": self.original_message}
        if self.log_stream_arn:
            fields["LogStreamArn"] = self.log_stream_arn
        return fields


class ModelNotReady(EndpointError):
    """429: the target model is still being downloaded or loaded; try again."""

    code = "ModelNotReadyException"
    status = 429


class InternalFailure(EndpointError):
    code = "InternalFailure"
    status = 500


class ServiceUnavailable(EndpointError):
    code = "ServiceUnavailable"
    status = 503


class RequestTimeout(EndpointError):
    """408: the request did not arrive completely in time (the local front's own bound)."""

    code = "RequestTimeoutException"
    status = 408


class UnknownOperation(EndpointError):
    """404 for a route the SageMaker Runtime API does not have."""

    code = "UnknownOperationException"
    status = 404


def model_error(target: str, status: int, original: str, *, log_hint: str, log_stream_arn: str = "",
                note: str = "") -> ModelError:
    """A ModelError worded like AWS's: 'Received client error (400) from model ... with message'.

    ``original`` is the container's answer verbatim (Triton's ``{"error": "..."}``), which is what
    AWS puts in OriginalMessage; the message quotes its text.
    """
    kind = "client" if 400 <= status < 500 else "server"
    text = triton_error_text(original) or "(no message)"
    message = f'Received {kind} error ({status}) from model {target} with message "{text}".'
    if note:
        message += f" {note}"
    message += f" See {log_hint} for more information."
    return ModelError(message, original_status=status, original_message=original, log_stream_arn=log_stream_arn)


def triton_error_text(body: bytes | str) -> str:
    """Triton's ``{"error": "..."}`` as plain text (the body itself when it is not that shape)."""
    text = (body.decode("utf-8", "replace") if isinstance(body, bytes) else body).strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"]
    return text


def answer_too_large(target: str, size: int, limit: int, *, log_hint: str, log_stream_arn: str = "") -> ModelError:
    """AWS's refusal of an answer over InvokeEndpoint's limit: a ModelError for a 413 "from the model"
    whose body SageMaker "could not load", with nothing of the answer passed on."""
    original = json.dumps({"error": f"the model's answer is {size} bytes, over the {limit} bytes an "
                                    "InvokeEndpoint answer may carry"})
    message = (f"Received client error (413) from model {target} and could not load the entire response "
               f"body: the answer is {size} bytes, over InvokeEndpoint's limit of {limit} bytes (6 MB). "
               f"See {log_hint} for more information.")
    return ModelError(message, original_status=413, original_message=original, log_stream_arn=log_stream_arn)
