"""`sage-llm install TARGET --dry-run`: the pip commands for each hardware's torch and the
rebuild; and, with pip replaced by a recorder, that they run in order and stop at a failure."""

from __future__ import annotations

import subprocess

import pytest

from sagellm.cli import install
from sagellm.cli.main import main


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"a dry run ran {a}")

    monkeypatch.setattr(subprocess, "call", refuse)


def dry(capsys, *args) -> tuple[int, list[str]]:
    rc = main(["install", *args, "--dry-run", "--torch-version", "2.13.0"])
    return rc, capsys.readouterr().out.splitlines()


def pip_lines(lines):
    return [line for line in lines if " -m pip install " in line]


def test_cpu(capsys):
    rc, lines = dry(capsys, "cpu")
    cmds = pip_lines(lines)
    assert rc == 0 and len(cmds) == 3
    assert "torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu" in cmds[0]
    assert "--no-build-isolation" in cmds[-1] and "SAGELLM_CUDA" not in cmds[-1]
    assert lines[-1] == "# dry run: nothing was run"


def test_cuda(capsys):
    rc, lines = dry(capsys, "cuda")
    cmds = pip_lines(lines)
    assert rc == 0
    assert "torch==2.13.0+cu128 --index-url https://download.pytorch.org/whl/cu128" in cmds[0]
    assert cmds[-1].startswith("env SAGELLM_CUDA=ON ") and "--no-build-isolation" in cmds[-1]
    rc, lines = dry(capsys, "cuda", "--cuda", "cu126")
    assert "whl/cu126" in pip_lines(lines)[0]
    rc = main(["install", "cuda", "--dry-run", "--cuda", "12.6"])
    assert rc == 2 and "--cuda = '12.6'" in capsys.readouterr().err


def test_ascend(capsys):
    rc, lines = dry(capsys, "ascend")
    cmds = pip_lines(lines)
    assert rc == 0 and "CANN" in lines[0]
    assert "torch==2.13.0" in cmds[0] and "whl/cpu" in cmds[0]
    assert "torch-npu==2.13.0" in cmds[1]
    assert cmds[-1].startswith("env SAGELLM_ASCEND=ON ")


@pytest.mark.parametrize("target", ["kunlun", "haiguang"])
def test_install_only_targets(capsys, target):
    rc, lines = dry(capsys, target)
    assert rc == 0 and "INSTALL-ONLY" in lines[0]
    assert pip_lines(lines) == []  # nothing to run: the vendor's SDK provides torch
    assert any("--skip-torch" in line for line in lines)


def test_skip_torch_only_rebuilds(capsys):
    rc, lines = dry(capsys, "cpu", "--skip-torch")
    cmds = pip_lines(lines)
    assert rc == 0 and len(cmds) == 2 and not any("torch==" in c for c in cmds)


def test_runs_in_order_and_stops_at_a_failure(monkeypatch, capsys):
    ran = []

    def fake_call(cmd):
        ran.append(cmd)
        return 0 if len(ran) == 1 else 7

    monkeypatch.setattr(subprocess, "call", fake_call)
    rc = main(["install", "cpu", "--torch-version", "2.13.0"])
    assert rc == 7 and len(ran) == 2
    assert ran[0] == install.plan("cpu", "2.13.0", "cu128", False)[0]
    assert "exited with 7" in capsys.readouterr().err
