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

_TARGET = r"\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)"  # (target "optional title")
_IMAGE = re.compile(r"!\[([^\]]*)\]" + _TARGET)
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]" + _TARGET)
_CODE = re.compile(r"(`+)(?:.*?)\1")  # an inline code span, left as it is
_FENCE = re.compile(r"^\s*(```|~~~)")


def _relative(target: str) -> bool:
    """A path inside the repository (not a URL, not //host, not an #anchor)."""
    return not re.match(r"^([a-z][a-z0-9+.-]*:|//|#)", target, re.IGNORECASE)


def _rewrite(text: str) -> str:
    def image(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2).strip("<>")
        if not _relative(target):
            return m.group(0)
        return f"*(picture: {alt}; `{target}` in the source distribution)*"

    def link(m: re.Match) -> str:
        label, target = m.group(1), m.group(2).strip("<>")
        if not _relative(target):
            return m.group(0)
        label = label.strip("`")
        if label == target:
            return f"`{label}`"
        return f"{label} (`{target}` in the source distribution)"

    return _LINK.sub(link, _IMAGE.sub(image, text))


def package_description(text: str) -> str:
    """README text with no link a package index cannot follow; code blocks and inline code
    are left as they are."""
    out, fenced = [], False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
            out.append(line)
            continue
        if fenced:
            out.append(line)
            continue
        pieces, last = [], 0
        for m in _CODE.finditer(line):
            pieces.append(_rewrite(line[last:m.start()]))
            pieces.append(m.group(0))
            last = m.end()
        pieces.append(_rewrite(line[last:]))
        out.append("".join(pieces))
    return "".join(out)


class DescriptionHook(MetadataHookInterface):
    PLUGIN_NAME = "custom"

    def update(self, metadata: dict) -> None:
        text = (Path(self.root) / "README.md").read_text(encoding="utf-8")
        metadata["readme"] = {"content-type": "text/markdown",
                              "text": package_description(text)}
