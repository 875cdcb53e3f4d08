"""Run untrusted Python (model-written code) in a contained child process.

Layers, from the kernel up:

1. A separate process started with ``python -I -S`` (isolated mode: no PYTHON* variables, no user
   site, script dir not on sys.path; ``-S`` unless ``site_packages``), a minimal environment and
   its own session, so the whole process group is SIGKILLed at the wall-clock timeout and after a
   normal exit (stragglers included).
2. Resource limits set in the child before any user code runs: address space (RLIMIT_AS), CPU
   seconds, processes (RLIMIT_NPROC), file size (RLIMIT_FSIZE, which also caps stdout/stderr since
   those are files), open files, no core dumps.
3. When the parent runs as root and the interpreter is readable by others, the child runs as
   ``nobody``: root ignores RLIMIT_NPROC and may write anywhere, ``nobody`` cannot.
4. An audit hook (PEP 578) installed by a small bootstrap before the user code: it refuses
   process creation (fork, exec, spawn, subprocess, os.system), signals to other processes,
   sockets, ctypes, changing rlimits, chdir, links/symlinks, and any write, delete, rename,
   chmod… outside the throwaway working directory.

The working directory is a fresh temporary directory, removed afterwards. Audit hooks are best
effort by CPython's own account (they are not a security boundary against a determined attacker,
e.g. one using a directory fd obtained some other way), so layer 3 or a container (nsjail, gVisor,
a throwaway VM) is what to rely on for hostile code at scale; these layers contain the accidents
RL policies actually produce: infinite loops, fork bombs, runaway allocation, stray files.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxResult", "run_python", "can_drop_privileges"]

# The bootstrap runs in the child as ``python -I -S -c BOOTSTRAP CONFIG_JSON``. Everything it needs
# is a local of _setup() so that user code, which runs in a fresh __main__ module, finds no handle
# on the hook's state; the hook's constants are baked into its code object (immutable, and
# rebinding __code__ is itself refused).
BOOTSTRAP = r"""
import sys
def _setup():
    import json, os, resource, types
    cfg = json.loads(sys.argv[1])
    def cap(name, value):
        limit = getattr(resource, name, None)
        if limit is not None and value is not None:
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass
    cap("RLIMIT_AS", cfg["memory_bytes"])
    cap("RLIMIT_CPU", cfg["cpu_seconds"])
    cap("RLIMIT_NPROC", cfg["max_processes"])
    cap("RLIMIT_FSIZE", cfg["max_file_bytes"])
    cap("RLIMIT_NOFILE", 64)
    cap("RLIMIT_CORE", 0)
    root = os.path.realpath(os.getcwd())
    prefix = root + os.sep
    realpath, join, isdir, fspath = os.path.realpath, os.path.join, os.path.isdir, os.fspath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    denied = frozenset((
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.startfile",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.call_function",
        "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "os.chdir", "os.chroot",
        "os.symlink", "os.link", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.remote_exec", "os.setuid", "os.setgid",
    ))
    # event -> position of its dir_fd argument (None: it has none)
    path_events = {
        "os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3, "os.utime": 3,
        "os.mkfifo": 2, "os.mknod": 3, "shutil.rmtree": 1, "os.truncate": None, "os.chflags": None,
        "os.setxattr": None, "os.removexattr": None,
    }
    frozen_attrs = frozenset(("__code__", "__globals__", "__closure__", "__defaults__", "__kwdefaults__"))

    def inside(path):
        if isinstance(path, int):
            return True
        full = realpath(join(root, os.fsdecode(fspath(path))))
        return full == root or full.startswith(prefix) or full == "/dev/null"

    def hook(event, args):
        if event in denied:
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = bool((flags or 0) & write_flags) or (mode is not None and any(c in mode for c in "wax+"))
            if writing and not inside(path):
                raise PermissionError("sandbox: writing outside the working directory is not allowed")
            if not writing and not inside(path) and isdir(path):
                # a directory fd outside would let os.open(name, dir_fd=fd) write there unseen
                raise PermissionError("sandbox: opening directories outside the working directory")
        elif event in path_events:
            at = path_events[event]
            if at is not None and len(args) > at and args[at] not in (-1, None):
                raise PermissionError("sandbox: dir_fd is not allowed")
            if isinstance(args[0], int) or not inside(args[0]):  # an int is an fd: fchmod, ftruncate
                raise PermissionError("sandbox: " + event + " outside the working directory")
        elif event == "os.rename":
            if args[2] != -1 or args[3] != -1 or not (inside(args[0]) and inside(args[1])):
                raise PermissionError("sandbox: " + event + " outside the working directory")
        elif event == "object.__setattr__" and len(args) > 1 and args[1] in frozen_attrs:
            raise PermissionError("sandbox: rebinding " + str(args[1]) + " is not allowed")

    with open(cfg["source"], encoding="utf-8") as f:
        code = compile(f.read(), "solution.py", "exec")
    main = types.ModuleType("__main__")
    main.__file__ = "solution.py"
    sys.modules["__main__"] = main
    sys.argv[:] = ["solution.py"]
    if cfg["audit_hook"]:
        sys.addaudithook(hook)
    return code, main.__dict__
_code, _globals = _setup()
del _setup
exec(_code, _globals)
"""

_MiB = 1024 * 1024
_NOBODY = "nobody"


@dataclass(frozen=True)
class SandboxResult:
    """What one run of untrusted code did."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _world_readable(path: Path, executable: bool = False) -> bool:
    """Whether a non-root user can reach ``path`` (every ancestor o+x, the file o+r, o+x if asked)."""
    try:
        path = path.resolve()
        for parent in path.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        wanted = stat.S_IROTH | (stat.S_IXOTH if executable else 0)
        return path.stat().st_mode & wanted == wanted
    except OSError:
        return False


def _others_can_traverse(directory: Path) -> bool:
    try:
        directory = directory.resolve()
        return all(p.stat().st_mode & stat.S_IXOTH for p in (directory, *directory.parents))
    except OSError:
        return False


def can_drop_privileges(python: str | None = None) -> bool:
    """True when running as root and ``python`` (and its stdlib) can run as ``nobody``.

    The temporary directory must be reachable by ``nobody`` too, or the child could not read its
    own script.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam(_NOBODY)
    except KeyError:
        return False
    executable = Path(python or sys.executable)
    tmp = Path(tempfile.gettempdir())
    if not _world_readable(executable, executable=True) or not _others_can_traverse(tmp):
        return False
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        return _world_readable(Path(os.__file__))  # the stdlib, as seen by this interpreter
    return True


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _read_capped(path: Path, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def run_python(
    source: str,
    stdin: str = "",
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_output_bytes: int = 8 * _MiB,
    python: str | None = None,
    site_packages: bool = False,
    drop_privileges: bool | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run ``source`` as a script in a sandboxed child process and return what it did.

    ``stdin`` is fed as standard input. The child is killed (with its process group) after
    ``timeout_s`` wall-clock seconds; its CPU time is capped at ceil(timeout_s) + 1 seconds, its
    address space at ``memory_mb``, every file it writes (stdout and stderr included) at
    ``max_output_bytes``. ``drop_privileges`` None means "run as nobody when possible" (see
    :func:`can_drop_privileges`). Nothing is written outside a temporary directory that is removed
    before returning. ``audit_hook=False`` leaves only the process-level layers (for testing them).
    """
    python = python or sys.executable
    drop = can_drop_privileges(python) if drop_privileges is None else drop_privileges
    base = Path(tempfile.mkdtemp(prefix="align-sandbox-"))
    try:
        work = base / "work"
        work.mkdir(mode=0o700)
        io_dir = base / "io"
        io_dir.mkdir(mode=0o700)
        script = work / "solution.py"
        script.write_text(source, encoding="utf-8")
        (io_dir / "stdin").write_text(stdin, encoding="utf-8")
        user_kwargs: dict[str, object] = {}
        if drop:
            entry = pwd.getpwnam(_NOBODY)
            os.chmod(base, 0o711)  # nobody may traverse to work/, not list or read io/
            for path in (work, script):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            user_kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        config = {
            "source": str(script),
            "memory_bytes": int(memory_mb) * _MiB,
            "cpu_seconds": int(timeout_s) + 2,
            "max_processes": int(max_processes),
            "max_file_bytes": int(max_output_bytes) + 1,  # one byte over the cap: tells truncation apart
            "audit_hook": bool(audit_hook),
        }
        flags = ["-I"] if site_packages else ["-I", "-S"]
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(work),
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
        start = time.monotonic()
        with (
            open(io_dir / "stdin", "rb") as fin,
            open(io_dir / "stdout", "wb") as fout,
            open(io_dir / "stderr", "wb") as ferr,
        ):
            proc = subprocess.Popen(  # noqa: S603 - the command is ours; the code it runs is the point
                [python, *flags, "-c", BOOTSTRAP, json.dumps(config)],
                cwd=work,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                env=env,
                start_new_session=True,
                close_fds=True,
                **user_kwargs,  # type: ignore[arg-type]
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Always, not only on timeout: a child may have left processes behind.
                _kill_group(proc.pid)
                proc.wait()
        duration = time.monotonic() - start
        stdout, cut_out = _read_capped(io_dir / "stdout", max_output_bytes)
        stderr, _ = _read_capped(io_dir / "stderr", 64 * 1024)
        return SandboxResult(
            returncode=None if timed_out else proc.returncode,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            duration_s=duration,
            truncated=cut_out,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
