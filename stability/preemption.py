"""Stop requests (a preemption notice, Ctrl-C), decided at the loop's call boundaries: on one
process a flag; on several (a pod), JAX's preemption sync point, so that every process stops at
the same boundary."""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax


class Preemption:
    """Stop requests, honoured at the next call boundary with a checkpoint, then exit 0.

    One process: SIGTERM (a preemption notice) and a first Ctrl-C set a flag. Several JAX
    processes (a pod): SIGTERM belongs to JAX's preemption notifier (installed by
    ``jax.distributed.initialize``), and every process learns the same stop step from
    ``multihost_utils.reached_preemption_sync_point``; a Ctrl-C is turned into a SIGTERM of
    this process, so it takes the same path. A second Ctrl-C exits at once (status 130).
    Nestable: an inner ``with`` of the same object changes nothing."""

    def __init__(self):
        self.requested = False  # a notice reached this process
        self.decided = False  # stop() said stop (on several processes: all of them did)
        self._old: dict = {}
        self._depth = 0
        self._boundaries = 0  # call boundaries seen by this process (JAX's sync-point ids)

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
            self._old = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                sys.stderr.write("interrupted again: exiting without a checkpoint\n")
                sys.stderr.flush()
                os._exit(130)
            if jax.process_count() > 1:
                self.requested = True  # the notifier makes it every process's decision
                os.kill(os.getpid(), signal.SIGTERM)
                return
        self.requested = True

    def stop(self) -> bool:
        """Whether to stop before the next call (the same answer on every process: call it
        at every call boundary). JAX's sync point is the boundary after the latest one any
        process had reached when the notice came, so it counts boundaries one by one."""
        if jax.process_count() == 1:
            self.decided = self.decided or self.requested
            return self.requested
        from jax.experimental import multihost_utils

        self._boundaries += 1
        stop = bool(multihost_utils.reached_preemption_sync_point(self._boundaries))
        self.decided = self.decided or stop
        return stop

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for s, old in self._old.items():
                signal.signal(s, old)
            self._old = {}
