"""Build-time metadata: the package description shown on PyPI and the napari hub.

README.md links its pictures and documents by paths inside the repository, which those
pages cannot resolve. The description built into the sdist and the wheel is README.md with
every relative link turned into plain text that names the file in the source distribution,
and every relative picture into a line saying where it is; absolute links stay as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

from hatchling.metadata.plugin.interface import MetadataHookInterface

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:|^#", target, re.IGNORECASE)


def package_description(text: str) -> str:
    """README text with no link a package index cannot follow."""

    def image(m: re.Match) -> str:
        alt, target = m.groups()
        if not _relative(target):
            return m.group(0)
        return f"*(picture: {alt}; `{target}` in the source distribution)*"

    def link(m: re.Match) -> str:
        label, target = m.groups()
        if not _relative(target):
            return m.group(0)
        label = label.strip("`")
        if label == target:
            return f"`{label}`"
        return f"{label} (`{target}` in the source distribution)"

    return _LINK.sub(link, _IMAGE.sub(image, text))


class DescriptionHook(MetadataHookInterface):
    PLUGIN_NAME = "custom"

    def update(self, metadata: dict) -> None:
        text = (Path(self.root) / "README.md").read_text(encoding="utf-8")
        metadata["readme"] = {"content-type": "text/markdown",
                              "text": package_description(text)}
