"""Where result and input images live on the studio's side, named by their content.

The browser keeps only ids (the session history is stored there), and Gradio serves the files
from this folder. An id is checked against its pattern before it is turned into a path, so a
history entry edited in the browser cannot point the studio at any other file.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from PIL import Image

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class ResultStore:
    def __init__(self, root: Path, max_items: int = 2000):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items  # oldest are removed past this; a history entry pointing there is dropped

    def save(self, png: bytes, name: str) -> str:
        """Keep `png` as `<root>/<id>/<name>` (the name is what a download is called); its id back."""
        result_id = hashlib.sha256(png).hexdigest()[:32]
        folder = self.root / result_id
        if not folder.is_dir():
            folder.mkdir()
            (folder / _safe_name(name)).write_bytes(png)
            self._prune()
        return result_id

    def path(self, result_id: object) -> Path | None:
        """The file behind an id, or None for an unknown or malformed id."""
        if not isinstance(result_id, str) or not ID_PATTERN.fullmatch(result_id):
            return None
        files = sorted((self.root / result_id).glob("*.png"))
        return files[0] if files else None

    def open(self, result_id: str) -> Image.Image | None:
        path = self.path(result_id)
        if path is None:
            return None
        with Image.open(path) as image:
            image.load()
            return image

    def _prune(self) -> None:
        folders = sorted(
            (folder for folder in self.root.iterdir() if folder.is_dir() and ID_PATTERN.fullmatch(folder.name)),
            key=lambda folder: folder.stat().st_mtime,
        )
        for folder in folders[: max(0, len(folders) - self.max_items)]:
            shutil.rmtree(folder, ignore_errors=True)


def _safe_name(name: str) -> str:
    stem = SAFE_NAME.sub("-", name).strip("-.") or "image"
    return stem if stem.endswith(".png") else f"{stem}.png"
