"""`Spelling`: how an error tells the user the remedy, in the words of the interface in use.

The engine refuses a run in a few ways that a user can lift (replace another run's results,
start again, rebuild a mismatched embedding cache, choose another output, a coarser level,
the axes, plane or series of an image, a checkpoint's import path). The remedy is spelled
differently in Python (`overwrite=True`), on the command line (`--overwrite`) and in the Run
xT widget (a tick box); the caller passes its `Spelling` to `run` and every refusal names
the control that applies. The defaults are the Python arguments.

Errors of the io and model packages carry their remedy as a key with values (`remedy`,
`values`, `problem`: see `napari_xt.io.errors`); `spell_error` words such an error for an
interface. A remedy's text is a template: mappings fill it as `{'z': 0}` in Python and as
`z=0` elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from napari_xt.io.errors import PYTHON_REMEDIES as _IO
from napari_xt.model.checkpoint import PYTHON_REMEDIES as _MODEL


@dataclass(frozen=True)
class Spelling:
    """How one interface words the remedies of refusals: a template per remedy, named by the keys
    that `hint` and the io and model errors use. The defaults are the Python arguments; `CLI` and
    `WIDGET` are the command line's and the Run xT widget's. `style`: how mappings filled into a
    template are written ("python" or "k=v")."""

    out: str = "choose another output store"
    overwrite: str = "pass overwrite=True to replace them"
    restart: str = "pass resume=False to start again"
    rebuild_cache: str = "pass cache='rebuild' to replace it, or cache=False"
    cache_path: str = "pass another cache=PATH, or cache=False"
    no_cache: str = "cache=False (--no-cache)"
    name: str = "pass another name= for this run's results, or choose another output store"
    axes: str = _IO["axes"]
    plane: str = _IO["plane"]
    series: str = _IO["series"]
    overwrite_it: str = _IO["overwrite_it"]
    official: str = _MODEL["official"]
    in_chans: str = _MODEL["in_chans"]
    level: str = "level={level}"
    pyramid: str = ("make a pyramid of it with napari_xt.io.convert and pass a coarser "
                    "level=")
    batch_size: str = "batch_size="
    accept_range: str = _IO["accept_range"]
    crop_context: str = "run it with context='crop'"
    style: str = "python"  # how mappings are written: "python" ({'z': 0}) or "k=v" (z=0)


CLI = Spelling(
    out="choose another --out",
    overwrite="pass --overwrite to replace them",
    restart="pass --restart to start again",
    rebuild_cache="pass --rebuild-cache to replace it, or --no-cache",
    cache_path="pass --no-cache, or choose another --out",
    no_cache="--no-cache",
    name="choose another --out",
    axes="pass --axes (e.g. --axes YX, YXC, CYX, or TCZYX with --plane t=0,z=0)",
    plane="choose one with --plane {plane}",
    series="choose one with --series N",
    overwrite_it="pass --overwrite to replace it",
    official="an official xT checkpoint is loaded with --model ZOO_NAME --weights FILE",
    in_chans="it needs an image with {in_chans} channels",
    level="--level {level}",
    pyramid="make a pyramid of it with napari-xt convert and predict a coarser --level",
    batch_size="--batch-size",
    accept_range="pass --accept-range to run on these values as they are",
    crop_context="run it with --context crop",
    style="k=v",
)


WIDGET = Spelling(
    out="choose another output store in Run xT",
    overwrite="untick 'resume a matching store' in Run xT to replace them",
    restart="untick 'resume a matching store' in Run xT to start again",
    rebuild_cache="untick 'resume a matching store' (rebuilds it) or 'cache region "
                  "embeddings' in Run xT",
    cache_path="untick 'cache region embeddings' in Run xT, or choose another output store",
    no_cache="'cache region embeddings' unticked in Run xT",
    name="choose another output store in Run xT",
    level="level {level} in Run xT",
    crop_context="choose 'crop' as context in Run xT",
    pyramid="open it as a pyramid (napari-xt convert makes one) and choose a coarser level "
            "in Run xT",
    style="k=v",
)


def _value(spelling: Spelling, value: Any) -> str:
    if isinstance(value, Mapping):
        if spelling.style == "python":
            return repr(dict(value))
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def hint(spelling: Spelling, key: str, **values: Any) -> str:
    """The remedy `key` in `spelling`'s words: its template filled with `values` (mappings
    written in the spelling's style)."""
    return getattr(spelling, key).format(**{k: _value(spelling, v) for k, v in values.items()})


def spell_error(err: BaseException, spelling: Spelling) -> str:
    """The error's message with its remedy (its own, or that of the error it wraps: an
    `EngineInputError` made from an io error) in `spelling`'s words; the message as it is
    when it names no remedy."""
    text = str(err)
    cause: BaseException | None = err
    while cause is not None:
        remedy = getattr(cause, "remedy", None)
        if remedy and hasattr(spelling, remedy):
            inner = str(cause)
            if text.endswith(inner):
                spelled = f"{cause.problem}; {hint(spelling, remedy, **cause.values)}"
                return text[: len(text) - len(inner)] + spelled
        cause = cause.__cause__
    return text
