"""What the studio signs with a key that never leaves it: history entries and the links it serves.

The browser keeps the session history (gr.BrowserState), and BrowserState's own key is in the
page's config, so anyone can write an entry that the studio decrypts. So each entry carries a
signature the server makes, for the designer it was made for:

    "signature": HMAC-SHA256(key, ["history-entry", owner, id, task, inputs, parent])   (64 hex digits)

over canonical JSON (keys sorted, no spaces, ASCII). The owner is the designer
(`Access.designer`); "id", the "inputs" and "parent" (the result it was made from: its lineage,
studio/session.py) are store ids. An entry made fresh (parent None) is signed without the parent,
as entries were before lineage, so histories signed then stay valid; one with a parent cannot
lose it, nor gain or change one, without the signature failing. The entry's parameters are not signed:
they are values the designer may type into the tab anyway (every job checks them again), and the
browser writes numbers back in its own way (JavaScript writes 5.0 as 5), which a signature over
them would not survive. The trusted copy of a result's parameters is the one in its PNG.

A served link's folder (see ResultStore.link) is named by `link_token`: another designer, or
anyone who knows an id, cannot name it.

The key is 32 random bytes in a file beside the results folder (not in it), readable by the
studio's user only, made on the first start: the history survives a restart, and a new key
(the file deleted) invalidates every history there is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

from sdserve.files import atomic_file

KEY_BYTES = 32
SIGNATURE_FIELD = "signature"
_ENTRY_PURPOSE = "history-entry"
_LINK_PURPOSE = "served-link"
_VISITOR_PURPOSE = "visitor-cookie"
# A link token is cut to 128 bits: unguessable, and a short folder name.
LINK_TOKEN_CHARS = 32


def key_path(results_dir: Path, purpose: str = "signing") -> Path:
    """Where a results folder's key for `purpose` (the store's signatures; the visitor cookies')
    is kept: beside the folder, so Gradio never serves it."""
    results_dir = Path(results_dir)
    return results_dir.parent / f".{results_dir.name}-{purpose}-key"


def load_key(path: Path) -> bytes:
    """The key in `path`, made (0600) when there is none, so that what it signed stays valid
    across restarts; ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, mode=0o600) as staging:
            staging.write_text(secrets.token_hex(KEY_BYTES))
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} is not a studio signing key ({2 * KEY_BYTES} hex digits); "
                         "delete it to make a new one (every session history is then lost)")
    return key


def _digest(key: bytes, *fields: Any) -> str:
    message = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, message.encode("ascii"), hashlib.sha256).hexdigest()


def entry_signature(key: bytes, owner: str, entry: dict) -> str:
    parent = entry.get("parent")
    lineage = () if parent is None else (parent,)  # a fresh entry: as signed before lineage (module docstring)
    return _digest(key, _ENTRY_PURPOSE, owner, entry.get("id"), entry.get("task"), entry.get("inputs") or {}, *lineage)


def signed(key: bytes, owner: str, entry: dict) -> dict:
    """The entry with its signature for `owner` (any signature it had replaced)."""
    unsigned = {name: value for name, value in entry.items() if name != SIGNATURE_FIELD}
    return {**unsigned, SIGNATURE_FIELD: entry_signature(key, owner, unsigned)}


def signature_matches(key: bytes, owner: str, entry: dict) -> bool:
    """Whether `entry` carries the signature the studio made for `owner` (compared in constant time).
    The entry's id, task, inputs and parent must be checked for their types first (they are hashed as JSON)."""
    signature = entry.get(SIGNATURE_FIELD)
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(signature.encode("ascii", "replace"), entry_signature(key, owner, entry).encode("ascii"))


def visitor_mac(key: bytes, visitor: str) -> str:
    """What a visitor cookie carries beside the visitor's id (access.new_visitor_cookie)."""
    return _digest(key, _VISITOR_PURPOSE, visitor)


def link_token(key: bytes, owner_key: str, result_id: str) -> str:
    """The folder name of `owner_key`'s link to a result (owner_key: store.owner_key of the owner)."""
    return _digest(key, _LINK_PURPOSE, owner_key, result_id)[:LINK_TOKEN_CHARS]
