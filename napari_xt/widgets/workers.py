"""Thread workers whose every error reaches the widget.

superqt's workers (behind `napari.qt.threading.create_worker`) treat a `RuntimeError` raised
inside a generator worker as "the worker object was deleted": they only warn, and emit
neither `errored` nor `finished`. Many real errors are RuntimeErrors (a refused checkpoint
is `CheckpointError(RuntimeError)`, torch raises RuntimeError for shape mismatches and out of
memory), so a widget waiting for `finished` would wait for ever. `start_worker` runs the
function through `guarded`, which hands every exception on as a `WorkerError` (a plain
`Exception`), so `errored` and then `finished` always come.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any


class WorkerError(Exception):
    """An exception raised in a worker thread; `error` is the original."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(describe(error))


def describe(error: BaseException) -> str:
    """One line for a user: the message of errors that explain themselves (bad input,
    refusals), the type and message of anything else."""
    if isinstance(error, WorkerError):
        return str(error)
    checkpoint = sys.modules.get("napari_xt.model.checkpoint")  # loaded if it was raised
    known: tuple[type, ...] = (ValueError, OSError, KeyError)
    if checkpoint is not None:
        known += (checkpoint.CheckpointError,)
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(error, known) and text:
        return text.strip("'\"") if isinstance(error, KeyError) else text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` (a function or a generator function) with every exception it raises turned
    into a `WorkerError`."""
    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def generator(*args: Any, **kwargs: Any):
            try:
                return (yield from func(*args, **kwargs))
            except Exception as err:  # noqa: BLE001 - every error goes to the widget
                raise WorkerError(err) from err
        return generator

    @functools.wraps(func)
    def function(*args: Any, **kwargs: Any):
        try:
            return func(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - every error goes to the widget
            raise WorkerError(err) from err
    return function


def start_worker(func: Callable[..., Any], *args: Any, **kwargs: Any):
    """A napari thread worker (not started) running `guarded(func)(*args, **kwargs)`."""
    from napari.qt.threading import create_worker

    return create_worker(guarded(func), *args, _start_thread=False, _ignore_errors=True,
                         **kwargs)
