"""W&B failing under `stability train`: its service process killed mid-run, and offline runs
uploaded by `wandb sync`.

Nothing here reaches the network: `wandb sync` talks to a fake W&B server on 127.0.0.1 (just
enough GraphQL and file_stream for an upload), and every other address is a closed local port.
"""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import tiny_config, write_config_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS, LOG_EVERY = 100, 2
KILL_AFTER = 12  # records in metrics.jsonl, of STEPS / LOG_EVERY
WARNING = "W&B disabled for this run"


def wandb_env(tmp: Path, **extra) -> dict:
    """Offline W&B, state under ``tmp``, any stray request sent to a closed port; WANDB_SILENT
    unset, so that stderr is what a user sees."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_SERVICE")}
    closed = "http://127.0.0.1:9"
    return {
        **env,
        "WANDB_MODE": "offline",
        "WANDB_BASE_URL": closed,
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_CONFIG_DIR": str(tmp / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb_data"),
        "HTTP_PROXY": closed,
        "HTTPS_PROXY": closed,
        "NO_PROXY": "127.0.0.1,localhost",
        **extra,
    }


def metrics(workdir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in recs]


def line_count(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def service_pids(pid: int) -> list[int]:
    """W&B service (wandb-core) processes that are children of ``pid``."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for kid in (task / "children").read_text().split():
                if b"wandb-core" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    found.append(int(kid))
    except FileNotFoundError:  # pid or a child ended meanwhile
        pass
    return found


def dead(pid: int) -> bool:
    """Gone or a zombie (its parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two offline runs side by side: one healthy, one whose W&B service is SIGKILLed mid-run.

    The healthy run is also the reference for the killed run's metrics.jsonl, which W&B never
    feeds (it equals a W&B-disabled run's, as test_train_faults checks); one run fewer to wait for.
    """
    tmp = tmp_path_factory.mktemp("wandb")
    # One record per call: W&B sees them one at a time, as a long run's, so that its
    # transaction log holds several blocks when the service is killed.
    cfg = tiny_config(
        train={
            "steps": STEPS,
            "log_every": LOG_EVERY,
            "eval_every": 50,
            "checkpoint_every": STEPS,
            "steps_per_call": LOG_EVERY,
        }
    )
    config = write_config_file(tmp / "cfg.py", cfg)
    procs = {}
    for name in ("healthy", "killed"):
        cmd = [
            sys.executable,
            "-m",
            "stability",
            "train",
            "--config",
            config,
            "--workdir",
            str(tmp / name),
            "--no-progress",
            "--config.wandb.mode=offline",
        ]
        procs[name] = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=wandb_env(tmp),
        )
    try:
        killed, path = procs["killed"], tmp / "killed" / "metrics.jsonl"
        deadline = time.time() + 300
        while line_count(path) < KILL_AFTER and killed.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        pids = service_pids(killed.pid)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        logged_at_kill = line_count(path)
        deadline = time.time() + 10
        while not all(map(dead, pids)) and time.time() < deadline:
            time.sleep(0.01)
        service_dead = all(map(dead, pids))
        outs = {name: (p, *p.communicate(timeout=600)) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return {
        "tmp": tmp,
        "outs": outs,
        "pids": pids,
        "service_dead": service_dead,
        "logged_at_kill": logged_at_kill,
    }


class FakeWandb(ThreadingHTTPServer):
    """Answers `wandb sync` like the W&B server would, keeping the history rows it receives."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.history: list[dict] = []
        self.runs: list[str] = []  # run ids named by upsertBucket
        self.file_stream: list[dict] = []


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out: dict = {}
        if self.path == "/graphql":
            query, var = (q := json.loads(body))["query"], q.get("variables") or {}
            if "upsertBucket" in query:
                self.server.runs.append(var.get("name"))
                project = {"id": "p", "name": "stability", "entity": {"id": "e", "name": "ent"}}
                out = {
                    "data": {
                        "upsertBucket": {
                            "inserted": True,
                            "bucket": {
                                "id": "b",
                                "name": var.get("name") or "run",
                                "displayName": "run",
                                "description": "",
                                "config": "{}",
                                "sweepName": None,
                                "historyLineCount": 0,
                                "project": project,
                            },
                        }
                    }
                }
            elif "createRunFiles" in query:
                files = [
                    {"name": f, "uploadUrl": f"{self.server.url}/upload/{f}"} for f in var["files"]
                ]
                out = {
                    "data": {"createRunFiles": {"runID": "b", "uploadHeaders": [], "files": files}}
                }
            else:
                out = {"data": {}}
        elif self.path.endswith("/file_stream"):
            req = json.loads(body)
            self.server.file_stream.append(req)
            hist = req.get("files", {}).get("wandb-history.jsonl", {})
            self.server.history += [json.loads(line) for line in hist.get("content", [])]
            out = {"exitcode": None, "limits": {}}
        self._reply(out)

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply({})

    def _reply(self, out):
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_wandb():
    server = FakeWandb()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def wandb_sync(run_dir: Path, server: FakeWandb, tmp: Path) -> subprocess.CompletedProcess:
    (run_dir,) = (run_dir / "wandb").glob("offline-run-*")
    env = wandb_env(
        tmp,
        WANDB_MODE="online",
        WANDB_BASE_URL=server.url,
        WANDB_API_KEY="x" * 40,
        NETRC=str(tmp / "netrc"),
    )
    return subprocess.run(
        [sys.executable, "-m", "wandb", "sync", str(run_dir)],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def assert_history_matches(history: list[dict], records: list[dict]) -> None:
    """W&B's rows hold every metric of the JSONL records, at the same steps."""
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    for h, r in zip(history, records, strict=True):
        assert {k: h.get(k) for k in r if k != "step"} == {
            k: v for k, v in r.items() if k != "step"
        }


def test_killed_service_training_goes_on_with_one_warning_and_complete_jsonl(runs):
    assert runs["pids"] and runs["service_dead"]  # the service was found and is dead
    assert runs["logged_at_kill"] < STEPS // LOG_EVERY  # ... before the run ended
    for name in ("healthy", "killed"):
        proc, _, err = runs["outs"][name]
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    err = runs["outs"]["killed"][2]
    assert err.count(WARNING) == 1, err[-3000:]
    assert WARNING not in runs["outs"]["healthy"][2]
    ref = metrics(runs["tmp"] / "healthy")
    assert [r["step"] for r in ref] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert metrics(runs["tmp"] / "killed") == ref


def test_offline_run_syncs_every_row(runs, fake_wandb):
    workdir = runs["tmp"] / "healthy"
    out = wandb_sync(workdir, fake_wandb, runs["tmp"])
    assert out.returncode == 0 and "Finished syncing" in out.stderr, out.stderr[-3000:]
    assert "ERROR" not in out.stderr, out.stderr[-3000:]
    full = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert_history_matches(fake_wandb.history, full)
    assert any(r.get("complete") and r.get("exitcode") == 0 for r in fake_wandb.file_stream)


def test_killed_run_syncs_up_to_the_kill(runs, fake_wandb):
    """The service writes its transaction log in 32 KiB blocks: the blocks on disk at the kill
    upload (a prefix of the rows, checked against the JSONL); the torn end is reported."""
    workdir = runs["tmp"] / "killed"
    out = wandb_sync(workdir, fake_wandb, runs["tmp"])
    assert out.returncode == 0, out.stderr[-3000:]
    # The last block almost surely ends inside a record; if not, the file merely lacks its end.
    assert "ends with an incomplete record" in out.stderr or "Finished syncing" in out.stderr
    synced = len(fake_wandb.history)
    assert 0 < synced <= runs["logged_at_kill"]
    full = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert_history_matches(fake_wandb.history, full[:synced])


def test_service_death_first_seen_by_finish(tmp_path):
    """No W&B call between the death and close(): finish raises (it does not hang), and that
    is the one warning; wandb's exit hook prints no traceback."""
    script = "import os, signal, time\nfrom pathlib import Path\n"
    script += inspect.getsource(service_pids) + inspect.getsource(dead)
    script += textwrap.dedent(f"""
        from stability.config import WandbConfig
        from stability.tracking import Tracker

        tracker = Tracker({str(tmp_path)!r}, WandbConfig(mode="offline"), {{}}, name="t")
        tracker.log([{{"step": 1, "loss": 1.0}}])
        pids = service_pids(os.getpid())
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        while not all(map(dead, pids)):
            time.sleep(0.01)
        tracker.close()
        print("killed", len(pids))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=wandb_env(tmp_path),
    )
    assert out.returncode == 0 and out.stdout.strip() == "killed 1", out.stderr[-3000:]
    assert out.stderr.count(WARNING) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


SEGMENT = """
import sys
from stability.config import WandbConfig
from stability.tracking import Tracker
steps = list(map(int, sys.argv[3].split(",")))
keep = steps[0] - 1 if sys.argv[2] == "1" else 0
tracker = Tracker(sys.argv[1], WandbConfig(), {}, name="r", keep_step=keep)
for step in steps:
    tracker.log([{"step": step, "train/loss": 1.0 / step}])
tracker.close()
"""


def test_rerun_segments_sync_into_one_run(tmp_path, fake_wandb):
    """Each (re)start of a run writes its own offline-run-* directory with the run's one W&B id;
    the documented `wandb sync <workdir>/wandb/offline-run-*` uploads them into that one run."""
    run_dir = tmp_path / "run"
    for resume, steps in (("0", "1,2,3"), ("1", "4,5,6")):
        subprocess.run(
            [sys.executable, "-c", SEGMENT, str(run_dir), resume, steps],
            env=wandb_env(tmp_path),
            check=True,
            timeout=300,
        )
    run_id = (run_dir / "wandb_id").read_text()
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in dirs)
    env = wandb_env(
        tmp_path,
        WANDB_MODE="online",
        WANDB_BASE_URL=fake_wandb.url,
        WANDB_API_KEY="x" * 40,
        NETRC=str(tmp_path / "netrc"),
    )
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", *map(str, dirs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0 and "ERROR" not in out.stderr, out.stderr[-3000:]
    assert set(fake_wandb.runs) == {run_id}
    assert [h["_step"] for h in fake_wandb.history] == [1, 2, 3, 4, 5, 6]
