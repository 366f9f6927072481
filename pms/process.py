"""Child processes that never outlive their parent.

Every server pms starts (PostgreSQL, Tansu, each service) goes through :func:`spawn`:
its own session (so a terminal's Ctrl-C reaches only the supervisor, which then stops
children in reverse dependency order), output appended to a log file, and Linux's
parent-death signal so even a ``kill -9`` of the supervisor leaves nothing behind.

Linux ties the parent-death signal to the *thread* that forked, not to the process: a
child forked by a worker thread is killed as soon as that thread ends. So every fork
happens on one daemon thread that lives exactly as long as the process (:class:`_Spawner`),
whichever thread calls :func:`spawn`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

_PR_SET_PDEATHSIG = 1


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: the supervisor's own cleanup still stops children
        return None


#: Loaded once here: a dlopen between fork and exec in a multi-threaded parent can deadlock the child.
_LIBC = _load_libc()


def _die_with(parent_pid: int) -> Callable[[], None]:
    """The child's pre-exec hook: SIGKILL me when the forking thread (hence the process) ends."""

    def hook() -> None:
        if _LIBC is None:
            return
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died between fork and prctl: then no signal will ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class _Spawner:
    """One daemon thread that performs every fork of this process.

    It lives until the process exits, so the parent-death signal of the children it forks
    fires exactly when the process dies (``kill -9`` included) and never when some worker
    thread that asked for the child returns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen[bytes]], Future[subprocess.Popen[bytes]]]]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def reset_after_fork(self) -> None:
        """A forked child inherits no threads: start a spawner of its own on first use."""
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._thread = None

    def run(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        """Call ``start`` (which forks) on the spawner thread and return its result or raise its error."""
        if threading.current_thread() is self._thread:
            return start()
        future: Future[subprocess.Popen[bytes]] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="pms-spawner", daemon=True)
                self._thread.start()
            self._jobs.put((start, future))
        try:
            return future.result()
        except BaseException:
            # Interrupted (Ctrl-C) while the fork was under way: do not leave an unowned child behind.
            future.add_done_callback(_kill_if_started)
            raise

    def _serve(self) -> None:
        while True:
            start, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(start())
            except BaseException as exc:  # handed to the caller, raised in its thread
                future.set_exception(exc)


def _kill_if_started(future: Future[subprocess.Popen[bytes]]) -> None:
    if future.exception() is None:
        proc = future.result()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


_spawner = _Spawner()
os.register_at_fork(after_in_child=_spawner.reset_after_fork)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with output appended to ``log_path``.

    Safe from any thread: the child dies with this process, not with the calling thread. The log
    is readable by its owner only (a folder made for it too): services never log patient data,
    but a third-party traceback (Streamlit's) can quote a value.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path.parent.chmod(0o700)  # one made before logs were private too
    parent_pid = os.getpid()

    def start() -> subprocess.Popen[bytes]:
        with open_private_log(log_path) as log:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                user=user,
                start_new_session=True,
                preexec_fn=_die_with(parent_pid),
            )

    return _spawner.run(start)


def stop(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Ask ``proc`` to stop with ``sig``; kill its whole process group after ``timeout``."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return proc.wait()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(timeout=5)


def open_private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, created (or made, if it was not) readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except PermissionError:  # another user's file we may still append to: leave its mode to its owner
        pass
    return os.fdopen(fd, "ab")


def rotate_log(path: Path, *, max_bytes: int, backups: int) -> bool:
    """Copy-truncate ``path`` once it is larger than ``max_bytes``; True if it rotated.

    The newest copy is ``<name>.1``, the oldest ``<name>.<backups>``; older ones are dropped
    (``backups=0`` only truncates). Copy-truncate rather than rename, because the writers are
    children whose stdout/stderr *is* this file: :func:`spawn` opens it with ``O_APPEND``,
    so after the truncate they go on writing at the new end, offset 0, without reopening
    anything (and without becoming sparse). The copy catches up with what was appended while
    it ran before truncating, so only a line written in the instant between the last read
    and the truncate could be lost -- the price logrotate's ``copytruncate`` pays too.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups > 0:
        for index in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            if older.exists():
                older.chmod(0o600)  # copies made before logs were private too
                os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
        newest = path.with_name(f"{path.name}.1")
        newest.unlink(missing_ok=True)
        with open(path, "rb") as source, open_private_log(newest) as copy:
            while chunk := source.read(1 << 20):  # until EOF, including what arrives meanwhile
                copy.write(chunk)
            os.truncate(path, 0)
    else:
        os.truncate(path, 0)
    return True


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``condition`` until true; raise ``TimeoutError`` at the deadline.

    ``alive`` lets a caller give up at once when the process being waited for has died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"process exited while waiting for {message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


#: What :func:`listen_problem` answers for a port that something else holds.
IN_USE = "in use"


def listen_problem(host: str, port: int) -> str | None:
    """Why nothing could listen on ``host:port`` right now: :data:`IN_USE`, another reason, or None.

    Only "address in use" means the port is taken; a host this machine does not have, or a name
    that does not resolve, is a wrong host setting and is reported as such.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return IN_USE
        return exc.strerror or str(exc)
    return None


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``."""
    return listen_problem(host, port) == IN_USE


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and benchmarks).

    Chosen below the kernel's ephemeral range: a port handed out by ``bind(0)`` comes from that
    range, where any outgoing connection made before the server binds it can take it first.
    """
    low, _ = _ephemeral_range()
    candidates = range(15000, low) if low > 16000 else range(0)
    for port in random.sample(candidates, k=min(50, len(candidates))):
        # Never the same port twice in one process: callers often take several before binding any.
        if port not in _handed_out and not port_in_use(host, port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
