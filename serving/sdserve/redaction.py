"""What must not reach a log line or a message others read: account ids, access key ids, ARNs,
file system paths. One set of patterns for the deploy tool and the studio (standard library only).
"""

from __future__ import annotations

import re

# Account ids stand alone as 12 digits (in ARNs, ECR registry hosts, "account 123456789012");
# access key ids are AKIA (long-term) or ASIA (temporary) and 16 more capitals or digits.
ACCOUNT_ID = (re.compile(r"(?<![0-9])[0-9]{12}(?![0-9])"), "<account>")
ACCESS_KEY_ID = (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), "<access key id>")
# Whole ARNs (an AccessDenied names the caller's IAM identity) and paths (model errors can carry them).
ARN = (re.compile(r"arn:aws[\w-]*:[^\s\"',;)]+"), "<arn>")
PATH = (re.compile(r"(?:/[\w.@+-]+){2,}/?"), "<path>")


def redact(text: str, *, arns: bool = False, paths: bool = False) -> str:
    """`text` with account ids and access key ids masked, and (when asked) whole ARNs and paths."""
    patterns = [*([ARN] if arns else []), ACCOUNT_ID, ACCESS_KEY_ID, *([PATH] if paths else [])]
    for pattern, mask in patterns:
        text = pattern.sub(mask, text)
    return text
