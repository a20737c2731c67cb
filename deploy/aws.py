"""AWS calls as data: a `Call` is printed by `plan` and run by the other commands, so the plan
shows exactly the requests the commands send.

Credentials come from boto3's standard chain and are never printed: only service, operation
and request parameters are. What the commands print while they run (progress, warnings, errors,
AWS's own error messages) goes through `redact`, which masks account ids and access key ids:
such output ends up in CI logs and issues.
"""

from __future__ import annotations

import pprint
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import ClientError
from sdserve.redaction import redact

# A boto3 "not found" comes under many codes; SageMaker's describe_* says ValidationException
# with "Could not find ..." in the message, so that code only counts together with the message.
NOT_FOUND_CODES = {
    "404", "NoSuchKey", "NoSuchBucket", "NotFound", "ResourceNotFound", "ResourceNotFoundException",
    "RepositoryNotFoundException", "ImageNotFoundException", "ObjectNotFoundException",
}
# The parameter that names what a call acts on, shown when the call runs.
NAME_PARAMETERS = ("ModelName", "EndpointConfigName", "EndpointName", "Key", "PolicyName", "ResourceId",
                   "repositoryName", "Bucket")


class DeployError(RuntimeError):
    """A command could not do its job; the message says why and what to do."""


@dataclass(frozen=True)
class Call:
    service: str  # boto3 client name
    operation: str  # client method
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # when or why the call is made, shown by `plan`

    def render(self) -> str:
        lines = [f"{self.service}.{self.operation}("]
        for key, value in self.params.items():
            prefix = f"    {key}="
            text = pprint.pformat(value, width=120 - len(prefix), sort_dicts=False)
            lines.append(prefix + text.replace("\n", "\n" + " " * len(prefix)) + ",")
        call = "\n".join(lines) + "\n)" if self.params else f"{self.service}.{self.operation}()"
        return f"# {self.note}\n{call}" if self.note else call

    @property
    def target(self) -> str:
        for name in NAME_PARAMETERS:
            if name in self.params:
                return str(self.params[name])
        return ""


class Aws:
    """boto3 clients for one region; every client goes to `endpoint_url` when one is set."""

    def __init__(self, region: str, endpoint_url: str | None = None) -> None:
        self._session = boto3.session.Session(region_name=region)
        self._endpoint_url = endpoint_url
        self._clients: dict[str, Any] = {}

    def __repr__(self) -> str:  # never show the session, which holds credentials
        return f"Aws(region={self._session.region_name!r})"

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(
                service,
                endpoint_url=self._endpoint_url,
                config=botocore.config.Config(retries={"mode": "standard", "max_attempts": 5}),
            )
        return self._clients[service]

    def run(self, call: Call, *, echo: bool = True) -> Any:
        """Make the call; changes are echoed as one line, reads are silent."""
        if echo:
            print(redact(f"  {call.service}.{call.operation} {call.target}".rstrip()))
        return getattr(self.client(call.service), call.operation)(**call.params)

    def paginate(self, call: Call, key: str) -> list[dict[str, Any]]:
        """Every item under `key` across the pages of a list call."""
        pages = self.client(call.service).get_paginator(call.operation).paginate(**call.params)
        return [item for page in pages for item in page.get(key, [])]

    def read(self, call: Call) -> Any | None:
        """A describe/head call, or None when the thing it asks about does not exist."""
        try:
            return self.run(call, echo=False)
        except ClientError as error:
            if is_not_found(error):
                return None
            raise


def is_not_found(error: ClientError) -> bool:
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "")
    return code in NOT_FOUND_CODES or (code in ("ValidationException", "ValidationError") and "not find" in message)
