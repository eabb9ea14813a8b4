"""benchmarks/attention.py and benchmarks/device_check.sh without a device: the device
script's command lines parse and plan, the tuner's candidates lower for CUDA, and a tune
result rewrites flash.TUNED into importable source."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from stability.kernels import flash

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "attention_bench", ROOT / "benchmarks/attention.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def device_script_commands() -> list[list[str]]:
    """Arguments of every attention.py call in device_check.sh, shell variables as "7"."""
    text = (ROOT / "benchmarks/device_check.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if "benchmarks/attention.py" not in line or line.lstrip().startswith("#"):
            continue
        line = line.split("2>&1")[0]
        line = next(p for p in re.split(r";|\|\||&&|\bthen\b", line) if "attention.py" in p)
        line = re.sub(r"\$\(\([^)]*\)\)", "7", line)
        line = re.sub(r"\$\{?\w+\}?", "7", line)
        words = shlex.split(line)
        commands.append(words[words.index("benchmarks/attention.py") + 1 :])
    return commands


def test_device_script_commands_parse_and_plan(capsys, tmp_path):
    commands = device_script_commands()
    flags = sorted(
        next(w for w in c if w in ("--tune", "--apply-tune", "--budget-s")) for c in commands
    )
    assert flags == ["--apply-tune", "--budget-s", "--tune"]
    parser = bench.build_parser()
    for args in commands:
        parser.parse_args(args)
    (bench_args,) = [c for c in commands if "--tune" not in c and "--apply-tune" not in c]
    bench.main([*bench_args, "--dry-run", "--out", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    planned = re.search(r"(\d+) rows planned", out)
    seqs = len(bench_args[bench_args.index("--seq") + 1].split(","))
    want = seqs * len(bench.MASKS) * len(bench.SCORES) * len(bench.IMPLS) * len(bench.MODES)
    assert planned and int(planned.group(1)) == want
    assert "plan cudnn" in out and "plan pallas-nostats" in out


@pytest.mark.parametrize(
    "argv", [["--impls", "pallas,flashy"], ["--seq", "4k"], ["--kernels", "gpu:fwd"]]
)
def test_bad_arguments_exit_2_naming_the_field(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--dry-run"])
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_tune_dry_run_lowers_every_candidate_for_cuda(tmp_path):
    """Each Mosaic GPU forward candidate that fits in shared memory lowers (the lowering is
    what rejects one over the limit); a dry run picks no best."""
    out = tmp_path / "tune.json"
    argv = ["--tune", "--dry-run", "--seq", "256", "--batch", "1", "--heads", "2"]
    bench.main([*argv, "--masks", "window", "--kernels", "mosaic_gpu:fwd", "--out", str(out)])
    result = json.loads(out.read_text())
    (entry,) = result["entries"]
    assert entry["key"]["backend"] == "mosaic_gpu" and entry["key"]["windowed"] is True
    assert len(entry["candidates"]) == len(bench.candidates("mosaic_gpu", "fwd", 128)) >= 3
    assert all(c.get("lowered") is True for c in entry["candidates"]), entry["candidates"]
    assert "best" not in entry
    with pytest.raises(SystemExit, match="dry-run"):
        bench.apply_tune(out)


def test_apply_tune_writes_importable_entries(tmp_path, monkeypatch):
    """The TUNED block is rewritten with the measured best per key; the defaults stay."""
    copy = tmp_path / "flash.py"
    copy.write_text(bench.FLASH_PY.read_text())
    monkeypatch.setattr(bench, "FLASH_PY", copy)
    key = flash.TuneKey("triton", "bwd", "bfloat16", 128, True, True, 4096)
    best = flash.KernelConfig(128, 64, num_warps=8, num_stages=3)
    result = dict(
        meta=dict(device="test-device"),
        dry_run=False,
        entries=[
            dict(key=key._asdict(), best=best.__dict__, candidates=[]),
            dict(key={**key._asdict(), "seq_len": 8192}, candidates=[dict(error="x")]),
        ],
    )
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(result))
    bench.apply_tune(path)
    source = copy.read_text()
    block = re.search(r"# BEGIN TUNED.*?# END TUNED", source, re.S).group(0)
    namespace = dict(TuneKey=flash.TuneKey, KernelConfig=flash.KernelConfig)
    exec(block, namespace)
    assert namespace["TUNED_ON"] == "test-device"
    assert namespace["TUNED"][key] == best
    assert {k: v for k, v in namespace["TUNED"].items() if k.seq_len is None} == {
        k: v for k, v in flash.TUNED.items() if k.seq_len is None
    }
    assert len(namespace["TUNED"]) == len(flash.TUNED) + 1  # the untimed key is left out
    assert max(len(line) for line in block.splitlines()) <= 100
