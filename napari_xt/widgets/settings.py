"""Persisted widget settings: one small JSON file in the user's config folder.

The folder is `$NAPARI_XT_CONFIG_DIR` when set (tests point it at a temporary folder), else
the platform's user config folder for ``napari-xt``. Unknown keys are kept, unreadable files
are ignored (defaults win) and writes are atomic, so a crash never leaves a broken file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_DIR = "NAPARI_XT_CONFIG_DIR"
FILE_NAME = "widgets.json"


def config_dir() -> Path:
    """Where napari-xt keeps its settings."""
    override = os.environ.get(ENV_DIR)
    if override:
        return Path(override)
    try:
        from platformdirs import user_config_dir
    except ImportError:  # platformdirs ships with napari; this is only a fallback
        return Path.home() / ".config" / "napari-xt"
    return Path(user_config_dir("napari-xt", appauthor=False))


class WidgetSettings:
    """A named section (one per widget) of the settings file."""

    def __init__(self, section: str, path: str | os.PathLike | None = None) -> None:
        self.section = section
        self.path = Path(path) if path is not None else config_dir() / FILE_NAME

    def _read_all(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self) -> dict[str, Any]:
        """This section's values ({} when nothing was saved yet)."""
        values = self._read_all().get(self.section, {})
        return dict(values) if isinstance(values, dict) else {}

    def save(self, values: dict[str, Any]) -> None:
        """Replace this section's values; other sections are kept."""
        data = self._read_all()
        data[self.section] = dict(values)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)
