"""Containment tests for the code-execution sandbox and the pass@k estimator.

The tests run one after another in the same session: after every hostile program the
evaluator (this process) keeps going and the next program still runs normally.
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
import sys
import time

import pytest

from llmforge.eval.passk import pass_at_k
from llmforge.eval.sandbox import (
    SANDBOX_UID,
    ExecutionResult,
    probe_isolation,
    run_program,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")
REPO = pathlib.Path(__file__).resolve().parents[1]


def _still_works() -> None:
    res = run_program("print(sum(range(10)))", timeout_s=5)
    assert res.status == "passed" and res.stdout.strip() == "45", res


def _live_pids_of_uid(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = pathlib.Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith(("Z", "X")):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            pids.append(int(name))
    return pids


# ------------------------------------------------------------------------------------ pass@k


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases_and_large_n():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c < k
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    exact = 1 - math.comb(1000, 100) / math.comb(1050, 100)
    assert pass_at_k(1050, 50, 100) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize(
    "args", [(0, 0, 1), (5, -1, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1), (True, 1, 1)]
)
def test_pass_at_k_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


# ----------------------------------------------------------------------------------- sandbox


@linux_only
def test_isolation_layers_reported():
    info = probe_isolation()
    assert info["audit_hook"] is True
    if os.geteuid() == 0:
        assert info["uid"] == SANDBOX_UID, info
        assert info["network_namespace"] is True, info


@linux_only
def test_correct_program_passes_and_failing_assert_fails():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n")
    assert isinstance(ok, ExecutionResult)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    assert ok.stdout.strip() == "ok"
    bad = run_program("assert 1 + 1 == 3\n")
    assert not bad.passed and bad.status == "failed" and bad.returncode == 1
    assert "AssertionError" in bad.stderr
    syntax = run_program("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


@linux_only
def test_infinite_loop_times_out():
    t0 = time.monotonic()
    res = run_program("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert res.status == "timeout" and not res.passed
    assert elapsed < 1.0 + 1.0, elapsed
    _still_works()


@linux_only
def test_fork_bomb_is_contained():
    res = run_program("import os\nwhile True:\n    os.fork()\n", timeout_s=3.0)
    assert res.status in ("blocked", "failed", "killed", "timeout") and not res.passed
    assert res.status == "blocked"  # the audit hook stops os.fork
    assert not _live_pids_of_uid(SANDBOX_UID)
    _still_works()


@linux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop (and so RLIMIT_NPROC) needs root")
def test_native_fork_bomb_bypassing_the_audit_hook_is_bounded_by_rlimit_nproc():
    # _posixsubprocess.fork_exec raises no audit event: each child keeps forking in its
    # preexec_fn. RLIMIT_NPROC (enforced thanks to the uid drop) caps the process count.
    bomb = (
        "import os, _posixsubprocess as P\n"
        "def bomb():\n"
        "    while True:\n"
        "        r, w = os.pipe()\n"
        "        try:\n"
        "            P.fork_exec([b'/bin/true'], [b'/bin/true'], True, (), None, None,\n"
        "                        -1, -1, -1, -1, -1, -1, r, w, False, False, -1,\n"
        "                        None, None, None, -1, bomb, False)\n"
        "        except Exception:\n"
        "            pass\n"
        "        os.close(r)\n"
        "        os.close(w)\n"
        "bomb()\n"
    )
    res = run_program(bomb, timeout_s=2.0, max_processes=16)
    assert res.status in ("timeout", "killed", "failed") and not res.passed
    assert res.seconds < 2.0 + 2.0
    assert not _live_pids_of_uid(SANDBOX_UID)
    _still_works()


@linux_only
@pytest.mark.parametrize("program", ["x = bytearray(10**10)\n", "x = [0] * 10**10\n"])
def test_huge_allocation_is_a_memory_error(program):
    res = run_program(program, timeout_s=5.0, memory_mb=256)
    assert res.status in ("memory", "failed") and not res.passed
    assert res.status == "memory"
    _still_works()


@linux_only
def test_writes_outside_the_workdir_are_blocked():
    outside = pathlib.Path("/tmp/llmforge_escape_test.txt")
    in_repo = REPO / "llmforge_escape_test.txt"
    for target in (outside, in_repo):
        target.unlink(missing_ok=True)
        res = run_program(f"open({str(target)!r}, 'w').write('x')\n")
        assert res.status == "blocked", res
        assert not target.exists()
    res = run_program(f"import os\nos.remove({str(REPO / 'pyproject.toml')!r})\n")
    assert res.status == "blocked" and (REPO / "pyproject.toml").exists()
    res = run_program("import os\nos.symlink('/tmp', 'link')\nopen('link/llmforge_x', 'w')\n")
    assert res.status == "blocked" and not pathlib.Path("/tmp/llmforge_x").exists()
    # inside the (fresh, then deleted) working directory writing is fine
    res = run_program(
        "import os\nopen('data.txt', 'w').write('hello')\nos.mkdir('sub')\n"
        "open('sub/f', 'w').write('x')\nprint(open('data.txt').read(), os.listdir('.'))\n"
    )
    assert res.status == "passed", res
    assert "hello" in res.stdout
    cwd = run_program("import os\nprint(os.getcwd())\n").stdout.strip()
    assert cwd and not os.path.exists(cwd)  # deleted afterwards


@linux_only
def test_no_network():
    res = run_program(
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('connected')\n",
        timeout_s=5.0,
    )
    assert res.status != "passed" and "connected" not in res.stdout
    assert res.status == "blocked"
    _still_works()


@linux_only
def test_subprocess_and_ctypes_are_blocked():
    assert run_program("import subprocess\nsubprocess.run(['ls'])\n").status == "blocked"
    assert run_program("import os\nos.system('ls')\n").status == "blocked"
    assert run_program("import ctypes\n").status == "blocked"
    # a program that catches the violation just goes on (and fails its own tests)
    caught = run_program(
        "import subprocess\ntry:\n    subprocess.run(['ls'])\nexcept PermissionError:\n"
        "    pass\nassert False\n"
    )
    assert caught.status == "failed"


@linux_only
def test_output_is_captured_and_truncated():
    res = run_program(
        "import sys\nprint('out-start')\nprint('a' * 100000)\n"
        "sys.stderr.write('err-start' + 'b' * 100000)\n"
    )
    assert res.status == "passed"
    assert res.stdout.startswith("out-start") and res.stderr.startswith("err-start")
    assert len(res.stdout) < 5000 and len(res.stderr) < 5000
    assert res.stdout.endswith("[truncated]")


@linux_only
def test_huge_output_hits_the_file_size_limit_without_hurting_the_evaluator():
    res = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=5)
    assert res.status in ("killed", "failed", "timeout") and not res.passed
    _still_works()
