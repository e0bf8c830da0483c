"""setup.py's profile-guided build (Note [Profile-guided build]): its fallbacks.

Building takes minutes, so these call the build command's steps directly, with
setup() itself stubbed out; and the training run itself runs on the installed build.
"""
import os
import runpy
import subprocess
import sys
import types

import pytest
import setuptools

import dtr
from dtr import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_py(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.delenv("DTR_NO_EXTENSION", raising=False)
    return runpy.run_path(os.path.join(ROOT, "setup.py"))


def _command(setup_py, built: str):
    command = object.__new__(setup_py["ProfileGuidedBuild"])
    command.get_ext_fullpath = lambda name: built
    return command


@pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built")
def test_the_profile_guided_builds_training_run_runs_on_this_build(tmp_path):
    # setup.py falls back to a build without a profile, with only a warning, when
    # the run fails: so the run must keep working as dtr changes.
    workload = os.path.join(ROOT, "csrc", "pgo_workload.py")
    package = os.path.dirname(os.path.abspath(dtr.__file__))
    run = subprocess.run([sys.executable, workload, package], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # It refuses to profile a dtr imported from anywhere but the build it was given.
    wrong = subprocess.run([sys.executable, workload, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0 and "not from" in wrong.stderr


def test_only_gcc_10_or_newer_builds_with_a_profile(setup_py, tmp_path):
    pgo_compiler = setup_py["_pgo_compiler"]
    assert not pgo_compiler(None)  # MSVC
    assert not pgo_compiler([str(tmp_path / "no-such-compiler")])
    fake = tmp_path / "clang++"
    fake.write_text("#!/bin/sh\necho 'clang version 17.0.0'\n")
    fake.chmod(0o755)
    assert not pgo_compiler([str(fake)])
    old = tmp_path / "g++-9"
    old.write_text("#!/bin/sh\n"
                   "if [ \"$1\" = -dumpversion ]; then echo 9.4.0; else echo 'Free Software Foundation'; fi\n")
    old.chmod(0o755)
    assert not pgo_compiler([str(old)])
    new = tmp_path / "g++-12"
    new.write_text(old.read_text().replace("9.4.0", "12"))
    new.chmod(0o755)
    assert pgo_compiler([str(new)])


def test_a_training_run_that_cannot_start_builds_without_a_profile(setup_py, tmp_path, capsys):
    command = _command(setup_py, str(tmp_path / "missing" / "_C.so"))
    assert command._train(types.SimpleNamespace(name="dtr._C"), str(tmp_path / "profile")) is False
    assert "could not run" in capsys.readouterr().err


@pytest.mark.parametrize("outcome", ["fails", "hangs", "leaves no profile"])
def test_a_failed_training_run_builds_without_a_profile(setup_py, tmp_path, capsys, monkeypatch, outcome):
    built = tmp_path / "_C.so"
    built.write_bytes(b"")

    def run(args, **kwargs):
        if outcome == "hangs":
            raise subprocess.TimeoutExpired(args, kwargs["timeout"])
        return subprocess.CompletedProcess(args, 1 if outcome == "fails" else 0, "", "Traceback: boom")

    monkeypatch.setattr(subprocess, "run", run)
    command = _command(setup_py, str(built))
    assert command._train(types.SimpleNamespace(name="dtr._C"), str(tmp_path / "profile")) is False
    err = capsys.readouterr().err
    assert {"fails": "Traceback: boom", "hangs": "could not run",
            "leaves no profile": "left no profile"}[outcome] in err


def test_a_training_run_that_leaves_a_profile_is_used(setup_py, tmp_path, monkeypatch):
    built = tmp_path / "_C.so"
    built.write_bytes(b"")
    profile = tmp_path / "profile"
    seen = {}

    def run(args, **kwargs):
        # the workload is given the package it must import, holding the built extension
        seen["package"] = args[-1]
        assert os.path.exists(os.path.join(args[-1], "_C.so"))
        assert os.path.exists(os.path.join(args[-1], "__init__.py"))
        assert kwargs["env"]["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(args[-1])
        (profile / "csrc").mkdir(parents=True)
        (profile / "csrc" / "runtime.gcda").write_bytes(b"")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    assert _command(setup_py, str(built))._train(types.SimpleNamespace(name="dtr._C"), str(profile)) is True
    assert os.path.basename(seen["package"]) == "dtr"
