"""The loop's writer thread: the host work of a call's outputs (metric records to JSONL and W&B,
early-warning lines and events, the progress bar) runs here, off the thread that dispatches the
device's calls, so a slow disk, bucket or W&B never delays the next call.

Tasks run in the order they were submitted. The loop drains the queue before a checkpoint
(records are never behind a checkpoint) and at the end of a stack. An exception in a task is
raised in the loop's thread at its next submit or drain; the tasks after it are skipped."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

DEPTH = 8  # queued tasks before submit waits for the writer (a bound on host memory)


class Writer:
    def __init__(self, depth: int = DEPTH):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._raised = False
        self._thread = threading.Thread(target=self._work, name="stability-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> None:
        self._raise()
        self._queue.put((fn, args))

    def drain(self) -> None:
        """Wait until every submitted task has run."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Run what is queued, then stop the thread (raising a task's exception, if any)."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            try:
                if self._error is None:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the loop's thread
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error
