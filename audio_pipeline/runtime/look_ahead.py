"""The next claim, prepared in a side thread while the current one is processed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from audio_pipeline.queue import Job


class LookAhead:
    """Runs ``prepare(jobs)`` at once in a daemon thread; the result waits here."""

    def __init__(self, jobs: list[Job], prepare: Callable[[list[Job]], Any], name: str) -> None:
        self.jobs = jobs
        self.prepared: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        # A daemon thread, not an executor: a forced stop must not wait for a download.
        self._thread = threading.Thread(target=self._run, args=(prepare,), name=name, daemon=True)
        self._thread.start()

    def _run(self, prepare: Callable[[list[Job]], Any]) -> None:
        try:
            self.prepared = prepare(self.jobs)
        except BaseException as exc:  # handed to the main thread, which settles the jobs
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once prepare_batch has returned or raised."""
        return self._done.wait(timeout)
