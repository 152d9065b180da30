"""Build-time metadata: the package description shown on PyPI and the napari hub.

README.md links its pictures and documents by paths inside the repository, which those
pages cannot resolve. The description built into the sdist and the wheel is README.md with
every relative link turned into plain text that names the file in the source distribution;
absolute links stay as they are. Relative pictures become absolute links under the pictures
URL where one is given (the environment variable NAPARI_XT_PICTURES_URL, else `pictures-url`
under `[tool.hatch.metadata.hooks.custom]` in pyproject.toml; `{version}` in it becomes the
package version, e.g. `https://raw.githubusercontent.com/OWNER/napari-xt/v{version}/`), so
that they render on PyPI and the napari hub; without one, a line says where each picture is.
"""

from __future__ import annotations

import os
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


def _rewrite(text: str, pictures_url: str) -> str:
    def image(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2).strip("<>")
        if not _relative(target):
            return m.group(0)
        if pictures_url:
            parts = [p for p in target.split("/") if p not in ("", ".")]
            if ".." in parts or re.search(r"[#?\\]", target):
                raise ValueError(f"README picture {target!r}: a path inside the repository "
                                 "without '..', '#', '?' or backslashes is needed for a URL")
            path = "/".join(parts)
            return f"![{alt}]({pictures_url.rstrip('/')}/{path.replace(' ', '%20')})"
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


def package_description(text: str, pictures_url: str = "") -> str:
    """README text with no link a package index cannot follow; relative pictures under
    `pictures_url` when given; code blocks and inline code are left as they are."""
    if pictures_url and (not re.match(r"^https://", pictures_url)
                         or re.search(r"[?#]", pictures_url)):
        raise ValueError(f"the pictures URL must start with https:// and hold no query or "
                         f"fragment, got {pictures_url!r}")
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
            pieces.append(_rewrite(line[last:m.start()], pictures_url))
            pieces.append(m.group(0))
            last = m.end()
        pieces.append(_rewrite(line[last:], pictures_url))
        out.append("".join(pieces))
    return "".join(out)


class DescriptionHook(MetadataHookInterface):
    PLUGIN_NAME = "custom"

    def update(self, metadata: dict) -> None:
        text = (Path(self.root) / "README.md").read_text(encoding="utf-8")
        url = os.environ.get("NAPARI_XT_PICTURES_URL") or self.config.get("pictures-url", "")
        url = str(url).replace("{version}", str(metadata.get("version", "")))
        metadata["readme"] = {"content-type": "text/markdown",
                              "text": package_description(text, url)}
