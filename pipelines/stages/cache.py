"""The one protocol every stage follows: fingerprint, reuse if complete, run, mark complete.

A stage's output lives in a folder named by the fingerprint of its inputs and config
(``<storage>/stages/<stage>/<fingerprint>/``, or a run's folder for pretraining). ``_COMPLETE.json`` is
written last and holds the stage's output record; a folder without it is partial and never read.

``cached_stage`` runs one stage under that protocol:

- complete and not ``force``: the recorded output, loaded (``reused``), nothing recomputed;
- otherwise the folder is wiped (a killed or failed run's leftovers), unless the stage is ``resumable``
  (pretraining: its checkpoints are what a rerun resumes from) and not ``force``;
- ``build(folder)`` writes the outputs and returns ``(output, record)``; ``record`` goes to
  ``_COMPLETE.json`` after everything else, so a crash at any point leaves no folder marked complete;
- a failing ``build`` leaves nothing behind (the folder is wiped again), except in a resumable stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from pipelines import storage

T = TypeVar("T")


def cached_stage(folder: str, build: Callable[[str], tuple[T, dict[str, Any]]],
                 load: Callable[[dict[str, Any]], T], *, force: bool = False, resumable: bool = False) -> T:
    """Reuse the complete output in ``folder`` (``load(record)``) or compute it (``build(folder)``)."""
    if not force:
        record = storage.read_complete(folder)
        if record is not None:
            return load(record)
    if force or not resumable:
        storage.delete_dir(folder)
    try:
        output, record = build(folder)
    except BaseException:
        if not resumable:
            with contextlib.suppress(Exception):
                storage.delete_dir(folder)
        raise
    storage.mark_complete(folder, record)
    return output
