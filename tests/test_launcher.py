"""The TPU-pod recipe as far as this machine can follow it: the launcher's ssh command (a fake
gcloud), the worker's install line from the lock (a fresh venv, pip's dry run), and
`stability prepare-data` on a dataset the test defines. (The worker script itself runs on 4
processes in tests/test_multihost.py.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data.test_tfds import StabilityTestText

from stability.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_launcher_runs_the_worker_script_on_every_worker_with_its_arguments(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'args'}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REPO": "src/stability"}
    subprocess.run(
        [
            "sweeps/launch_tpu_pod.sh",
            "my-tpu",
            "us-west4-a",
            "sweeps/qk_norm.py:accelerator",
            "gs://b/runs/qk",
            "--config.data.tokenizer_path=gs://b/t5 model",
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-west4-a"]
    assert "--worker=all" in args
    (command,) = [a for a in args if a.startswith("--command=")]
    assert command.startswith(
        "--command=cd src/stability && WANDB_MODE=${WANDB_MODE:-offline} "
        "sweeps/pod_worker.sh sweeps/qk_norm.py:accelerator gs://b/runs/qk "
    )
    assert command.endswith(
        r"--config.data.tokenizer_path=gs://b/t5\ model"
    )  # quoted for the shell


@pytest.mark.slow
def test_worker_install_line_resolves_from_the_lock_in_a_fresh_venv(tmp_path):
    """The worker's install line, in a fresh venv, as a dry run (PyPI, no download of the
    packages themselves): it resolves, with jax at the lock's version and the tpu extra's
    libtpu and gcsfs."""
    line = next(
        x
        for x in (ROOT / "sweeps/pod_worker.sh").read_text().splitlines()
        if "pip install" in x and "lock.txt" in x
    ).strip()
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    cmd = line.replace(".venv/bin/python", str(tmp_path / "venv" / "bin" / "python"))
    cmd += f" --dry-run --ignore-installed --report {tmp_path / 'report.json'}"
    out = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    lock = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements/lock.txt").read_text(), re.M
        )
    )
    assert got["jax"] == lock["jax"] and got["jaxlib"] == lock["jaxlib"]
    assert "libtpu" in got and "gcsfs" in got


def test_prepare_data_builds_array_record_and_refuses_unknown_names(tmp_path, capsys):
    assert StabilityTestText.name == "stability_test_text"  # registered with tfds on import
    assert main(["prepare-data", "--name=stability_test_text", f"--data-dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "stability_test_text prepared under" in out and "train 41 examples" in out
    assert list((tmp_path / "stability_test_text").rglob("*.array_record-*"))
    assert main(["prepare-data", "--name=no_such_dataset", f"--data-dir={tmp_path}"]) == 2
    assert "--name='no_such_dataset' is not a tfds dataset" in capsys.readouterr().err


# Every dataset the README names for `stability prepare-data`.
README_DATASETS = ("c4/en:3.1.0", "lm1b")


def test_readme_datasets_are_found_without_tensorflow_in_a_fresh_process(tmp_path):
    """In a fresh process (tfds registers text builders only when their module is imported),
    `stability prepare-data` finds C4 and names the one package it lacks to build it (Apache
    Beam), in one line and exit 2, before any download; lm1b's builder and every README
    dataset's info (features, no download) are there too."""
    names = ", ".join(map(repr, README_DATASETS))
    code = f"""
import sys
import tensorflow_datasets as tfds
from stability.cli import main
from stability.data.tfds import register_builders
rc = main(["prepare-data", "--name=c4/en:3.1.0", "--data-dir={tmp_path}"])
for name in ({names},):
    print(name, sorted(tfds.builder(name, data_dir="{tmp_path}").info.features))
sys.exit(rc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("stability: error")]
    assert "--name='c4/en:3.1.0'" in line and "pip install apache-beam" in line
    assert (
        "c4/en:3.1.0 ['content-length', 'content-type', 'text', 'timestamp', 'url']" in out.stdout
    )
    assert "lm1b ['text']" in out.stdout
    assert not [f for f in (tmp_path / "downloads").rglob("*") if f.is_file()]  # no download


@pytest.mark.parametrize("name", README_DATASETS)
def test_readme_datasets_train_through_the_mock_path(tmp_path, name):
    """data.source=tfds reads each README dataset's split layout (tfds' mock examples)."""
    from stability.config import DataConfig
    from stability.data.tfds import TfdsSource

    cfg = DataConfig(
        source="tfds",
        tfds_name=name,
        tfds_data_dir=str(tmp_path),
        tfds_split="train",
        tfds_eval_split="validation",
        seq_len=15,
        batch_size=4,
    )
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8):
        source = TfdsSource(cfg, vocab_size=258)
        batch = source.train_stream(0).next()
        evals = source.eval_batches(1)
    assert batch["tokens"].shape == evals[0]["tokens"].shape == (4, 16)


def test_worker_refuses_a_python_older_than_3_11(tmp_path):
    old = tmp_path / "python3.9"
    old.write_text(
        '#!/bin/sh\ncase "$2" in *version_info*) exit 1;; *python_version*) echo 3.9.18;; esac\n'
    )
    old.chmod(0o755)
    out = subprocess.run(
        ["sweeps/pod_worker.sh", "sweeps/qk_norm.py:cpu", str(tmp_path / "w")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": str(old)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "is Python 3.9.18, the project needs >= 3.11" in out.stderr
    assert not (tmp_path / "w").exists()
