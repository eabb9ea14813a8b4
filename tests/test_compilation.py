"""Stored executables (``compilation.Program``): a fresh compile stores its executable, a later
Program of the same key and signature loads it without tracing (locally or on a bucket); any
other key, a source that changed under the process or an unreadable file compiles; an
executable that came from JAX's persistent cache is never stored. Multi-process loading:
tests/test_multihost.py."""

import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import compilation as C
from stability import workdir as W


@pytest.fixture
def store(tmp_path, monkeypatch):
    C.setup_compilation_cache()  # the test session's persistent cache (tests/conftest.py)
    monkeypatch.setattr(C, "executables_dir", lambda: tmp_path)
    return tmp_path


def fresh():
    """A function no earlier compile of the session had (its constant is new)."""
    c = random.random()
    return lambda x, y: jnp.sin(x) * y + c


def never_traced(x, y):
    raise AssertionError("traced")


def program(fn, key="k"):
    return C.Program("prog", jax.jit(fn, donate_argnums=0), key)


def args():
    return jnp.arange(6.0), jnp.full((6,), 2.0)


def test_stored_then_loaded_without_tracing_and_donating(store, capsys):
    fn = fresh()
    want = program(fn)(*args())
    assert "compiled prog in" in capsys.readouterr().err
    assert len(list(store.iterdir())) == 1
    x, y = args()
    got = program(never_traced)(x, y)
    assert "prog: loaded executable (" in capsys.readouterr().err
    np.testing.assert_array_equal(got, want)
    assert x.is_deleted() and not y.is_deleted()  # the loaded program donates as compiled


def test_stored_and_loaded_on_a_bucket(tmp_path, monkeypatch, capsys):
    from fake_gcs import bucket

    C.setup_compilation_cache()
    with bucket(tmp_path):  # gs://b/... served from tmp_path/b/..., whole objects only
        store = W.path("gs://b/cache") / C.EXECUTABLES
        monkeypatch.setattr(C, "executables_dir", lambda: store)
        fn = fresh()
        want = program(fn)(*args())
        assert len(list(store.iterdir())) == 1
        np.testing.assert_array_equal(program(never_traced)(*args()), want)
    assert "prog: loaded executable (" in capsys.readouterr().err
    assert len(list((tmp_path / "b" / "cache" / C.EXECUTABLES).iterdir())) == 1


def test_another_key_signature_or_environment_compiles(store, capsys, monkeypatch):
    fn = fresh()
    program(fn)(*args())
    program(fn, key="other")(*args())
    program(fn)(jnp.arange(7.0), jnp.ones(7))
    monkeypatch.setattr(C, "environment", lambda: ("another jaxlib",))
    program(fn)(*args())
    assert capsys.readouterr().err.count("compiled prog in") == 4
    assert len(list(store.iterdir())) == 4


def test_source_changed_under_the_process_neither_loads_nor_stores(store, capsys, monkeypatch):
    fn = fresh()
    program(fn)(*args())
    monkeypatch.setattr(C, "_STARTED", 0.0)  # every source file is newer than the process
    monkeypatch.setattr(C, "_said_source_changed", False)
    assert C.source_digest() is None
    program(fn)(*args())
    program(fn)(jnp.arange(7.0), jnp.ones(7))
    err = capsys.readouterr().err
    assert err.count("compiled prog in") == 3
    assert err.count("changed after this process imported them") == 1
    assert len(list(store.iterdir())) == 1


def test_the_digest_covers_the_modules_programs_are_traced_from(tmp_path, monkeypatch):
    copy = tmp_path / "stability"
    shutil.copytree(C.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    files = {str(f.relative_to(copy)) for f in C.source_files(copy)}
    traced = {"programs.py", "step.py", "models/transformer.py", "models/__init__.py"}
    assert traced | {"kernels/flash.py", "optim/spam.py", "config.py", "__init__.py"} <= files
    assert not files & {"cli.py", "loop.py", "report.py", "sweep.py", "reproduce/rules.py"}
    monkeypatch.setattr(C, "PACKAGE", copy)
    monkeypatch.setattr(C, "_STARTED", float("inf"))  # the copy's edits are not "under" us
    digest = C.source_digest()
    with open(copy / "report.py", "a") as f:
        f.write("# a host-only edit\n")
    assert C.source_digest() == digest
    with open(copy / "models" / "layers.py", "a") as f:
        f.write("# an edit of traced code\n")
    assert C.source_digest() != digest


def test_the_traced_closure_follows_relative_and_nested_imports(tmp_path):
    root = tmp_path / "pkg"
    for name, text in {
        "__init__.py": "",
        "programs.py": "from .step import f\nfrom . import helper\n",
        "step.py": "def f():\n    from stability.models import layers\n",
        "helper.py": "",
        "host.py": "",
        "models/__init__.py": "",
        "models/layers.py": "from ..step import f\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    got = {str(f.relative_to(root)) for f in C.source_files(root)}
    assert got == {"__init__.py", "programs.py", "step.py", "helper.py", "models/__init__.py",
                   "models/layers.py"}  # fmt: skip


def test_an_unreadable_file_compiles_and_is_replaced(store, capsys):
    fn = fresh()
    want = program(fn)(*args())
    (file,) = store.iterdir()
    file.write_bytes(b"not an executable")
    np.testing.assert_array_equal(program(fn)(*args()), want)
    err = capsys.readouterr().err
    assert f"warning: prog: stored executable {file} not loaded" in err
    assert "compiled prog in" in err
    np.testing.assert_array_equal(program(never_traced)(*args()), want)
    assert "prog: loaded executable" in capsys.readouterr().err


def test_an_executable_from_the_persistent_cache_is_not_stored(store, capsys):
    # XLA:CPU serializes such an executable without some of its kernels: run, it fails with
    # "Function ... not found".
    fn = fresh()
    program(fn)(*args())
    (file,) = store.iterdir()
    file.unlink()
    jax.clear_caches()  # the next compile asks the persistent cache
    program(fn)(*args())
    assert "prog: from cache (" in capsys.readouterr().err
    assert not list(store.iterdir())
