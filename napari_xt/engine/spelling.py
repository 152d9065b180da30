"""`Spelling`: how an error tells the user the remedy, in the words of the interface in use.

The engine refuses a run in a few ways that a user can lift (replace another run's results,
start again, rebuild a mismatched embedding cache, choose another output). The remedy is
spelled differently in Python (`overwrite=True`), on the command line (`--overwrite`) and in
the Run xT widget (a tick box); the caller passes its `Spelling` to `run` and every refusal
names the control that applies. The defaults are the Python arguments.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spelling:
    out: str = "choose another output store"
    overwrite: str = "pass overwrite=True to replace them"
    restart: str = "pass resume=False to start again"
    rebuild_cache: str = "pass cache='rebuild' to replace it, or cache=False"
    cache_path: str = "pass another cache=PATH, or cache=False"
    no_cache: str = "cache=False (--no-cache)"
    name: str = "pass another name= for this run's results, or choose another output store"


CLI = Spelling(
    out="choose another --out",
    overwrite="pass --overwrite to replace them",
    restart="pass --restart to start again",
    rebuild_cache="pass --rebuild-cache to replace it, or --no-cache",
    cache_path="pass --no-cache, or choose another --out",
    no_cache="--no-cache",
    name="choose another --out",
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
)


def hint(spelling: Spelling, key: str) -> str:
    return getattr(spelling, key)
