"""Run untrusted, model-written Python programs (HumanEval-style) in a contained child process.

What is contained, and how
--------------------------
Every call to :func:`run_program` starts a fresh ``python -I -S -B`` (``sys.executable``) in a
new temporary working directory, which is deleted afterwards. Layers, outermost first:

* **Resource limits** (``setrlimit`` in the child before ``exec``): ``RLIMIT_AS`` (memory),
  ``RLIMIT_CPU`` (a little over the timeout), ``RLIMIT_FSIZE`` (10 MB, which also bounds the
  captured stdout/stderr files), ``RLIMIT_NPROC`` (``max_processes``) and ``RLIMIT_CORE`` 0.
* **Wall-clock timeout and cleanup**: the child is a session leader (``start_new_session``);
  on timeout, and after every normal exit, the whole process group is killed with SIGKILL and
  ``/proc`` is scanned for stragglers of that session/group. ``PR_SET_PDEATHSIG`` kills the
  child if the evaluator dies.
* **Privilege drop**: the kernel does not enforce ``RLIMIT_NPROC`` for root, so when the
  evaluator runs as root the child switches to uid/gid 65534 (``nobody``) with no
  supplementary groups, and ``PR_SET_NO_NEW_PRIVS``; the temporary directory is chowned to
  that uid. If the interpreter or its standard library is not readable by ``nobody`` (e.g. a
  pyenv install under a ``0700`` ``/root``), the child keeps exactly one capability,
  ``CAP_DAC_READ_SEARCH`` (read/traverse any file, no writes), as an ambient capability so it
  can still load Python. It does not exempt from ``RLIMIT_NPROC``. If even that fails the
  child runs without the uid drop (then ``RLIMIT_NPROC`` is not enforced for root);
  :func:`probe_isolation` reports which mode is in use.
* **No network**: as root the child enters a new, empty network namespace
  (``unshare(CLONE_NEWNET)`` through ``ctypes``, since ``os.unshare`` only exists from Python
  3.12), where only a downed loopback exists. Failing that, only the audit hook below applies.
* **Audit hook** (``sys.addaudithook``, installed by a guard preamble run in the same
  interpreter before the program; it cannot be removed): raises :class:`PermissionError`
  (a ``SandboxViolation``) for socket connect/bind/sendto/sendmsg/name lookups, opening a file
  for writing (or opening a directory) outside the working directory, removing / renaming /
  linking / chmod / mkdir etc. outside it, ``subprocess.Popen``, ``os.system``, ``os.exec*``,
  ``os.posix_spawn*``, ``os.spawn*``, ``os.fork``/``os.forkpty``, ``os.kill*`` and all of
  ``ctypes`` (so ``import ctypes`` fails). If such an error propagates uncaught, the run's
  status is ``"blocked"``; a program that catches it just goes on (and usually fails).

What is *not* guaranteed
------------------------
This is process-level hardening, not a VM or container. Audit hooks are a best-effort layer
in the same address space as the attacker: native code (an extension module already
importable, or ``_posixsubprocess.fork_exec`` which has no audit event) bypasses them; what
then still holds are the rlimits, the uid drop (file permissions of ``nobody``, who can still
write world-writable places such as ``/tmp``) and the network namespace. Reads of the file
system are allowed (with ``CAP_DAC_READ_SEARCH`` even of root-only files), so do not run this
on a host holding secrets. A process that calls ``setsid()`` leaves the process group; it is
still bounded by ``RLIMIT_NPROC``/``RLIMIT_CPU`` and killed when its parent chain dies only if
it was not detached. Use a real VM/gVisor/firecracker for hostile workloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

__all__ = [
    "BLOCKED_EXIT_CODE",
    "ExecutionResult",
    "MEMORY_EXIT_CODE",
    "SANDBOX_UID",
    "probe_isolation",
    "run_program",
]

SANDBOX_UID = 65534  # nobody
SANDBOX_GID = 65534  # nogroup
BLOCKED_EXIT_CODE = 91
MEMORY_EXIT_CODE = 92
BLOCKED_MARKER = "[llmforge-sandbox] blocked"
MAX_OUTPUT_BYTES = 4096
FILE_SIZE_LIMIT = 10 * 1024 * 1024

_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed run.

    ``status`` is one of ``"passed"`` (exit code 0 within limits), ``"failed"`` (non-zero
    exit), ``"timeout"`` (wall clock or CPU limit), ``"memory"`` (MemoryError), ``"killed"``
    (ended by a signal, e.g. the file-size limit), ``"blocked"`` (a sandbox rule stopped it).
    """

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


# --------------------------------------------------------------------------------------------
# The guard preamble, run inside the child before the program.
# --------------------------------------------------------------------------------------------

_GUARD = r'''
def _llmforge_install_guard(root):
    import posix
    import sys

    class SandboxViolation(PermissionError):
        """Raised by the llmforge sandbox audit hook."""

    _lstat, _readlink, _getcwd, _stat = posix.lstat, posix.readlink, posix.getcwd, posix.stat
    _fspath, _isinstance, _bytes, _int = posix.fspath, isinstance, bytes, int
    _len = len
    _stderr_write = sys.stderr.write
    S_IFMT, S_IFLNK, S_IFDIR = 0o170000, 0o120000, 0o040000
    W_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC
    ALLOWED_FILES = ("/dev/null", "/dev/stdout", "/dev/stderr")
    BLOCKED = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.spawn",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "socket.gethostbyname_ex", "socket.getnameinfo", "socket.sethostname",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.setprofile", "sys.settrace", "sys.remote_exec",
    ))
    # event -> (indices of path arguments that must lie inside root, indices of dir_fd args)
    PATH_EVENTS = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.mkfifo": ((0,), (2,)),
        "os.mknod": ((0,), (3,)), "os.chroot": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
        "shutil.copyfile": ((1,), ()), "shutil.copymode": ((1,), ()),
        "shutil.copystat": ((1,), ()), "shutil.copytree": ((1,), ()),
        "shutil.move": ((0, 1), ()), "shutil.chown": ((0,), ()),
        "shutil.make_archive": ((0,), ()), "shutil.unpack_archive": ((1,), ()),
    }

    def resolve(p):
        if p.startswith("/"):
            parts = p.split("/")
        else:
            parts = _getcwd().split("/") + p.split("/")
        out = []
        hops = 0
        i = 0
        while i < _len(parts):
            part = parts[i]
            i += 1
            if part in ("", "."):
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            cand = "/" + "/".join(out + [part])
            try:
                st = _lstat(cand)
            except OSError:
                out.append(part)
                continue
            if (st.st_mode & S_IFMT) == S_IFLNK:
                hops += 1
                if hops > 40:
                    raise SandboxViolation("sandbox: too many symlinks")
                target = _readlink(cand)
                rest = parts[i:]
                if target.startswith("/"):
                    out = []
                parts = target.split("/") + rest
                i = 0
                continue
            out.append(part)
        return "/" + "/".join(out)

    def inside(p):
        return p == root or p.startswith(root + "/")

    def to_str(p):
        p = _fspath(p)
        if _isinstance(p, _bytes):
            p = p.decode("utf-8", "surrogateescape")
        return p

    def deny(event, detail):
        try:
            _stderr_write("%s: %s %s\n" % (BLOCKED_MARKER, event, detail))
        except BaseException:
            pass
        raise SandboxViolation("sandbox: %s is not allowed (%s)" % (event, detail))

    def check_path(event, p):
        if _isinstance(p, _int):
            if event in ("os.truncate",):
                return
            deny(event, "file descriptor")
        s = to_str(p)
        if s in ALLOWED_FILES:
            return
        if not inside(resolve(s)):
            deny(event, s)

    def hook(event, args):
        if event in BLOCKED or event.startswith("ctypes."):
            deny(event, "")
        if event == "open":
            path, flags = args[0], args[2]
            if path is None or _isinstance(path, _int):
                return
            s = to_str(path)
            if s in ALLOWED_FILES:
                return
            real = resolve(s)
            if inside(real):
                return
            if flags & W_FLAGS:
                deny("open for writing", s)
            try:
                is_dir = (_stat(real).st_mode & S_IFMT) == S_IFDIR
            except OSError:
                is_dir = False
            if is_dir:
                deny("open of a directory", s)
            return
        idx = PATH_EVENTS.get(event)
        if idx is not None:
            paths, dir_fds = idx
            absolute = True
            for j in paths:
                if j < _len(args) and args[j] is not None:
                    check_path(event, args[j])
                    absolute = absolute and to_str(args[j]).startswith("/")
            for j in dir_fds:
                if j < _len(args) and args[j] is not None and args[j] != -1 and not absolute:
                    deny(event, "relative path with dir_fd")

    sys.addaudithook(hook)
    return SandboxViolation
'''

_RUNNER = r"""
_llmforge_violation = _llmforge_install_guard(ROOT)
del _llmforge_install_guard


def _llmforge_run():
    import os
    import sys
    import traceback
    import types

    module = types.ModuleType("__main__")
    module.__file__ = PROGRAM
    sys.modules["__main__"] = module
    sys.argv = [PROGRAM]
    try:
        code = compile(SOURCE, PROGRAM, "exec")
        exec(code, module.__dict__)
    except (SystemExit, KeyboardInterrupt):
        raise
    except _llmforge_violation:
        traceback.print_exc()
        exit_code = BLOCKED_EXIT_CODE
    except MemoryError:
        traceback.print_exc()
        exit_code = MEMORY_EXIT_CODE
    else:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(exit_code)


_llmforge_run()
"""


def _build_script(root: str, program: str, source: str) -> str:
    header = (
        f"ROOT = {root!r}\nPROGRAM = {program!r}\nSOURCE = {source!r}\n"
        f"BLOCKED_MARKER = {BLOCKED_MARKER!r}\n"
        f"BLOCKED_EXIT_CODE = {BLOCKED_EXIT_CODE}\nMEMORY_EXIT_CODE = {MEMORY_EXIT_CODE}\n"
    )
    # the marker is inlined as a literal so the hook does not read a (mutable) global
    guard = _GUARD.replace("BLOCKED_MARKER", repr(BLOCKED_MARKER))
    return header + guard + _RUNNER


# --------------------------------------------------------------------------------------------
# Child set-up (runs between fork and exec).
# --------------------------------------------------------------------------------------------

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _unshare = _LIBC.unshare
    _prctl = _LIBC.prctl
    _capset = _LIBC.capset
except (OSError, AttributeError):  # not glibc/Linux
    _LIBC = _unshare = _prctl = _capset = None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _world_accessible(path: str) -> bool:
    """Whether uid ``nobody`` can traverse to and read ``path`` (ignoring ACLs)."""
    try:
        path = os.path.realpath(path)
        st = os.stat(path)
        if not st.st_mode & stat.S_IROTH:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _interpreter_world_accessible() -> bool:
    stdlib = os.path.dirname(os.__file__)
    return all(
        _world_accessible(p)
        for p in (sys.executable, stdlib, os.path.join(stdlib, "encodings", "__init__.py"))
    )


# privilege mode: "drop" (plain uid drop), "drop+dac_read_search", "none"
_mode_lock = threading.Lock()
_mode: str | None = None
_probe_cache: dict | None = None


def _initial_mode() -> str:
    if os.name != "posix" or os.geteuid() != 0:
        return "none"
    if _interpreter_world_accessible():
        return "drop"
    return "drop+dac_read_search" if _capset is not None else "none"


def _make_preexec(mode: str, timeout_s: float, memory_mb: int, max_processes: int):
    cpu = int(math.ceil(timeout_s)) + 1
    mem = int(memory_mb) * 1024 * 1024
    keep_dac = mode == "drop+dac_read_search"
    drop = mode.startswith("drop")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    bit = 1 << _CAP_DAC_READ_SEARCH
    data = (_CapData * 2)(_CapData(bit, bit, bit), _CapData(0, 0, 0))

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if _unshare is not None and os.geteuid() == 0:
            _unshare(_CLONE_NEWNET)  # best effort; the audit hook is the fallback
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        if drop:
            if keep_dac:
                if _prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
            os.setgroups([])
            os.setgid(SANDBOX_GID)
            os.setuid(SANDBOX_UID)
            if keep_dac:
                if _capset(ctypes.byref(header), data) != 0:
                    raise OSError(ctypes.get_errno(), "capset")
                if _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0):
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_RAISE)")
        if _prctl is not None:
            _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.umask(0o077)
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))  # last: the parent image is big

    return preexec


# --------------------------------------------------------------------------------------------
# Cleanup helpers.
# --------------------------------------------------------------------------------------------


def _stray_pids(leader: int) -> list[int]:
    """Live (non-zombie) processes whose session or process group is ``leader``."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
            fields = raw[raw.rindex(")") + 2 :].split()
            state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        except (OSError, ValueError, IndexError):
            continue
        if state not in ("Z", "X") and (pgrp == leader or session == leader):
            found.append(int(name))
    return found


def _kill_group(leader: int) -> None:
    for _ in range(50):
        with contextlib.suppress(OSError):
            os.killpg(leader, signal.SIGKILL)
        strays = [p for p in _stray_pids(leader) if p != os.getpid()]
        if not strays:
            return
        for pid in strays:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _read_head(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", "replace")
    if len(data) > limit:
        text += "\n...[truncated]"
    return text


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def run_program(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_processes: int = 64,
) -> ExecutionResult:
    """Run ``source`` as a Python program in a fresh sandboxed process; never raises for
    anything the program does (errors of the sandbox itself come back as a result too)."""
    if not isinstance(source, str):
        raise TypeError("source must be a str")
    if not timeout_s > 0 or memory_mb < 16 or max_processes < 1:
        raise ValueError("timeout_s must be > 0, memory_mb >= 16, max_processes >= 1")
    global _mode
    with _mode_lock:
        if _mode is None:
            _mode = _initial_mode()
        mode = _mode
    start = time.monotonic()
    message = ""
    for attempt in range(3):
        try:
            return _run(source, mode, timeout_s, memory_mb, max_processes, start)
        except _TransientSpawnError as exc:
            if attempt == 2:
                return _error_result(f"sandbox could not start the program: {exc}", start)
            time.sleep(0.5)
        except _SpawnError as exc:
            message = str(exc)
            break
        except Exception as exc:  # noqa: BLE001 - the evaluator must keep going
            return _error_result(f"sandbox error: {type(exc).__name__}: {exc}", start)
    if mode != "none":  # the uid drop did not work on this host: fall back, and remember it
        with _mode_lock:
            _mode = "none"
        try:
            return _run(source, "none", timeout_s, memory_mb, max_processes, start)
        except _SpawnError as second:
            message = str(second)
        except Exception as exc:  # noqa: BLE001
            return _error_result(f"sandbox error: {type(exc).__name__}: {exc}", start)
    return _error_result(f"sandbox could not start the program: {message}", start)


class _SpawnError(Exception):
    pass


class _TransientSpawnError(_SpawnError):
    pass


def _error_result(message: str, start: float) -> ExecutionResult:
    return ExecutionResult(False, "failed", None, "", message, time.monotonic() - start)


def _run(
    source: str, mode: str, timeout_s: float, memory_mb: int, max_processes: int, start: float
) -> ExecutionResult:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="llmforge_sandbox_"))
    outdir = tempfile.mkdtemp(prefix="llmforge_sandbox_out_")  # owned by us, not the child
    proc = None
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        main = os.path.join(outdir, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(_build_script(workdir, program, source))
        os.chmod(outdir, 0o755)
        os.chmod(main, 0o644)
        if mode.startswith("drop"):
            os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
            os.chown(program, SANDBOX_UID, SANDBOX_GID)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONHASHSEED": "0",
        }
        out_path, err_path = os.path.join(outdir, "stdout"), os.path.join(outdir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", main],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=_make_preexec(mode, timeout_s, memory_mb, max_processes),
                )
            except BlockingIOError as exc:  # EAGAIN: e.g. RLIMIT_NPROC still full of zombies
                raise _TransientSpawnError(f"{type(exc).__name__}: {exc}") from exc
            except (OSError, subprocess.SubprocessError) as exc:
                raise _SpawnError(f"{type(exc).__name__}: {exc}") from exc
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        seconds = time.monotonic() - start
        rc = proc.returncode
        stdout = _read_head(out_path, MAX_OUTPUT_BYTES)
        stderr = _read_head(err_path, MAX_OUTPUT_BYTES)
        if timed_out or rc in (-signal.SIGXCPU,):
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif rc == BLOCKED_EXIT_CODE and BLOCKED_MARKER in _read_head(err_path, 1 << 20):
            status = "blocked"
        elif rc == MEMORY_EXIT_CODE and "MemoryError" in stderr:
            status = "memory"
        elif rc is not None and rc < 0:
            status = "killed"
        else:
            status = "failed"
        if rc == 0 and seconds > timeout_s + 5:
            status = "timeout"
        return ExecutionResult(status == "passed", status, rc, stdout, stderr, seconds)
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)


def probe_isolation() -> dict:
    """Report which containment layers work on this host (cached): privilege mode, the uid the
    program ran as, whether it had a network namespace, and whether the audit hook blocked."""
    global _probe_cache
    if _probe_cache is not None:
        return dict(_probe_cache)
    probe = (
        "import os\n"
        "print(os.getuid())\n"
        "with open('/proc/net/dev') as f:\n"
        "    print(sorted(l.split(':')[0].strip() for l in f.readlines()[2:]))\n"
        "import subprocess\n"
        "subprocess.run(['true'])\n"
    )
    res = run_program(probe, timeout_s=10.0)
    lines = res.stdout.splitlines()
    info = {
        "privilege_mode": _mode,
        "uid": int(lines[0]) if lines and lines[0].isdigit() else None,
        "interfaces": lines[1] if len(lines) > 1 else None,
        "network_namespace": len(lines) > 1 and lines[1] == "['lo']",
        "audit_hook": res.status == "blocked",
    }
    _probe_cache = info
    return dict(info)
