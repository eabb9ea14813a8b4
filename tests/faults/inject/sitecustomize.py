"""Fault injection for tests/faults/test_timed_kills.py: SIGKILL this process at a chosen point
inside an orbax checkpoint write or inside an append to results.jsonl.

Python imports ``sitecustomize`` at start-up from the first sys.path entry that has one, so this
file acts only in a child process whose PYTHONPATH names this directory, and only if
STABILITY_KILL_AT is set (otherwise it installs nothing). It mocks nothing: an audit hook
(``sys.addaudithook``) watches the file-system events that the real code raises, and kills the
process when the chosen one fires. Audit hooks run *before* the operation they report, so the
operation itself never happens.

STABILITY_KILL_AT=FAULT:N, N counting from 1 in this process:

  ckpt_data:N       the N-th checkpoint save, once its array data are on disk (tensorstore has
                    written ``ocdbt.process_0/d/*``) but before orbax writes the item's
                    ``_METADATA`` (audit event ``open`` of
                    ``<step>.orbax-checkpoint-tmp/<item>.orbax-checkpoint-tmp/_METADATA``)
  ckpt_commit:N     the N-th checkpoint save at its last operation: every file written, only the
                    rename ``<step>.orbax-checkpoint-tmp`` -> ``<step>`` left (event ``os.rename``)
  results_append:N  the N-th append to ``results.jsonl``, before its first byte (event ``open``
                    with an append mode)
  results_torn:N    the same, after appending the first half of the record being appended,
                    without its newline: a write torn by the crash

Before killing, one JSON line describing the event is appended to STABILITY_KILL_LOG (if set):
the test's proof that the kill landed inside the window.

If another ``sitecustomize`` is on sys.path (e.g. in site-packages), it is run too.
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))

# <workdir>/checkpoints/<step>.orbax-checkpoint-tmp[-<timestamp>]/<item>.orbax-checkpoint-tmp[...]
_TMP = r"\.orbax-checkpoint-tmp(?:-\d+)?"
_CKPT_DATA = re.compile(rf"/(\d+){_TMP}/[^/]+{_TMP}/_METADATA$")
_CKPT_COMMIT_SRC = re.compile(rf"/(\d+){_TMP}$")


def _matches(fault: str, event: str, args: tuple) -> bool:
    if fault == "ckpt_data":
        return event == "open" and "w" in str(args[1]) and bool(_CKPT_DATA.search(str(args[0])))
    if fault == "ckpt_commit":
        if event != "os.rename":
            return False
        src, dst = str(args[0]), str(args[1])
        m = _CKPT_COMMIT_SRC.search(src)
        return bool(m) and os.path.basename(dst) == m.group(1)
    if fault in ("results_append", "results_torn"):
        return (
            event == "open"
            and isinstance(args[0], (str, bytes, os.PathLike))
            and os.fsdecode(args[0]).endswith("results.jsonl")
            and "a" in str(args[1])
        )
    raise ValueError(f"STABILITY_KILL_AT: unknown fault {fault!r}")


def _record_being_appended() -> str | None:
    """The line that the caller (workdir.Jsonl.flush) is about to write, if it can be seen."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return None
        line = frame.f_locals.get("text")
        if isinstance(line, str) and line.endswith("\n"):
            return line
        frame = frame.f_back
    return None


def _install(spec: str) -> None:
    fault, _, n = spec.partition(":")
    target = int(n)
    _matches(fault, "", ("", ""))  # unknown fault names fail at start-up, not silently
    log = os.environ.get("STABILITY_KILL_LOG")
    state = {"count": 0}
    busy = threading.local()
    watched = {"open", "os.rename"}

    def hook(event, args):
        if event not in watched or getattr(busy, "on", False):
            return
        busy.on = True  # the hook's own file operations raise audit events too
        try:
            if not _matches(fault, event, args):
                return
            state["count"] += 1
            if state["count"] != target:
                return
            info = {
                "fault": fault,
                "n": target,
                "event": event,
                "args": [os.fsdecode(a) if isinstance(a, (str, bytes)) else a for a in args[:2]],
                "thread": threading.current_thread().name,
            }
            if fault == "results_torn":
                line = _record_being_appended() or '{"run_id": "torn-by-the-fault-injector"}\n'
                torn = line.encode("utf-8")[: len(line) // 2]
                fd = os.open(os.fsdecode(args[0]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, torn)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                info["torn"] = torn.decode("utf-8", errors="replace")
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(info) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
            while True:  # never let this thread go on with the operation
                time.sleep(1)
        finally:
            busy.on = False

    sys.addaudithook(hook)


def _chain() -> None:
    """Run the sitecustomize this file shadows, if there is one."""
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    if spec.origin and os.path.abspath(spec.origin) == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


if os.environ.get("STABILITY_KILL_AT"):
    _install(os.environ["STABILITY_KILL_AT"])
_chain()
