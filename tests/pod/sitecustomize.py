"""For child processes of the pod tests (PYTHONPATH names this directory): a fake gs:// bucket
(``STABILITY_FAKE_GCS=ROOT``) and pod-like device memory queries (``STABILITY_FAKE_POD=1``),
both from tests/fake_gcs.py, installed for the life of the process."""

import os
import sys

_ACTIVE = []  # the entered context managers (a collected one would undo its patches)

if os.environ.get("STABILITY_FAKE_GCS") or os.environ.get("STABILITY_FAKE_POD"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fake_gcs

    if os.environ.get("STABILITY_FAKE_GCS"):
        _ACTIVE.append(fake_gcs.bucket(fake_gcs.Path(os.environ["STABILITY_FAKE_GCS"])))
    if os.environ.get("STABILITY_FAKE_POD"):
        _ACTIVE.append(fake_gcs.pod_devices())
    for cm in _ACTIVE:
        cm.__enter__()

# ``STABILITY_TEST_SIGTERM_AT=STEP``: this process sends itself SIGTERM (a preemption notice,
# as a pod's maintenance event delivers it) once the host has read the call that ends at or
# after STEP, i.e. while the next call runs; the time it did goes to ``STABILITY_TEST_SIGTERM_LOG``.
# JAX's sync protocol decides the stop step about 0.5-1 s after a notice (measured here, idle),
# while these tiny runs train a call in milliseconds: so that the notice never races the end of
# the run, this process then takes SLOW_CALL seconds per call (the others wait for it in the
# call's collectives) until every process has stopped.
SLOW_CALL = 2.0
if os.environ.get("STABILITY_TEST_SIGTERM_AT"):
    import signal
    import time

    from stability import loop as _loop

    _at, _sent = int(os.environ["STABILITY_TEST_SIGTERM_AT"]), []
    _finish = _loop._Loop._finish

    def _finish_then_notice(self, call):
        _finish(self, call)
        if _sent:
            time.sleep(SLOW_CALL)
        elif call.end >= _at:
            _sent.append(call.end)
            with open(os.environ["STABILITY_TEST_SIGTERM_LOG"], "w") as f:
                f.write(f"{time.time()} {call.end}\n")
            os.kill(os.getpid(), signal.SIGTERM)

    _loop._Loop._finish = _finish_then_notice

# ``STABILITY_TEST_SIGTERM_IN_COMPILE=1``: this process sends itself SIGTERM right after it has
# compiled its first train call (a notice during a sweep's up-front compile), then takes
# SLOW_CALL seconds, so that the others are still before their first call boundary.
if os.environ.get("STABILITY_TEST_SIGTERM_IN_COMPILE"):
    import signal
    import time

    from stability import programs as _programs

    _compile, _noticed = _programs.compile_call, []

    def _compile_then_notice(*args, **kwargs):
        report = _compile(*args, **kwargs)
        if not _noticed:
            _noticed.append(True)
            with open(os.environ["STABILITY_TEST_SIGTERM_LOG"], "w") as f:
                f.write(f"{time.time()} compile\n")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(SLOW_CALL)
        return report

    _programs.compile_call = _compile_then_notice

# ``STABILITY_TEST_EVENT_LOG=PATH``: this process writes to PATH.<process index> the order in
# which the loop dispatches each train call, dispatches the gather of its outputs and reads
# them: lines "call c", "gather c", "read c" (no timing); and "replayed" once it has read the
# runs' records back (a resume's early-warning replay), "records" once it has opened them for
# writing (process 0), "barrier" once it has passed the loop's wait for every process.
if os.environ.get("STABILITY_TEST_EVENT_LOG"):
    from stability import compilation as _compilation
    from stability import sharding as _sharding

    _events, _calls, _labels = [], {}, {}  # call outputs' ids → call numbers; gathers' too
    _call, _gather, _fetch = _compilation.Program.__call__, _sharding.gather, _sharding.fetch

    def _log(line):
        import jax

        _events.append(line)
        path = f"{os.environ['STABILITY_TEST_EVENT_LOG']}.{jax.process_index()}"
        with open(path, "a") as f:
            f.write(line + "\n")

    def _logged_call(self, *args):
        out = _call(self, *args)
        if self.name.startswith("train call"):
            _calls[id(out[1]["alive"])] = c = len(_calls)
            _log(f"call {c}")
        return out

    def _logged_gather(tree):
        g = _gather(tree)
        c = _calls.get(id(tree.get("alive"))) if isinstance(tree, dict) else None
        if c is not None:  # the gather of a call's outputs
            _labels[id(g)] = c
            _log(f"gather {c}")
        return g

    def _logged_fetch(g):
        out = _fetch(g)
        if id(g) in _labels:
            _log(f"read {_labels.pop(id(g))}")
        return out

    _compilation.Program.__call__ = _logged_call
    _sharding.gather, _sharding.fetch = _logged_gather, _logged_fetch

    from stability import loop as _loop

    _trackers, _wait = _loop._trackers, _loop.wait_for_all_processes
    _replay = _loop._Loop.replay_watch

    def _logged_replay(self, start):
        _replay(self, start)
        _log("replayed")

    def _logged_trackers(*args, **kwargs):
        out = _trackers(*args, **kwargs)
        _log("records")
        return out

    def _logged_wait():
        _wait()
        _log("barrier")

    _loop._trackers, _loop.wait_for_all_processes = _logged_trackers, _logged_wait
    _loop._Loop.replay_watch = _logged_replay
