"""pms.process: children that die with their parent process (not with a thread) and copy-truncate logs.

Real processes and real signals; every wait is a ``wait_until`` with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from pms import process

#: A child that reports whether its parent-death signal is SIGKILL, once the test says "go".
CHILD = """
import ctypes, os, signal, sys, time
PR_GET_PDEATHSIG = 2
sig = ctypes.c_int(0)
ctypes.CDLL("libc.so.6").prctl(PR_GET_PDEATHSIG, ctypes.byref(sig))
print("child running", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
sys.exit(0 if sig.value == signal.SIGKILL else 7)
"""

#: A parent that spawns a long-running child from a thread that then ends, prints the child's pid, and waits.
PARENT = """
import sys, threading
from pathlib import Path
from pms import process
log = Path(sys.argv[1])
box = []
worker = threading.Thread(target=lambda: box.append(process.spawn(["sleep", "300"], log_path=log)))
worker.start()
worker.join()
tid = worker.native_id
process.wait_until(lambda: not Path(f"/proc/self/task/{tid}").exists(), timeout=10, message="thread gone")
print(box[0].pid, flush=True)
threading.Event().wait()
"""


def _thread_gone(thread: threading.Thread) -> bool:
    """True once the OS thread has fully exited (past the point where Linux sends parent-death signals)."""
    return not Path(f"/proc/self/task/{thread.native_id}").exists()


def _spawn_in_thread(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    box: list[subprocess.Popen[bytes]] = []
    worker = threading.Thread(target=lambda: box.append(process.spawn(argv, log_path=log_path)))
    worker.start()
    worker.join(timeout=30)
    assert box, "spawn from the worker thread failed"
    process.wait_until(lambda: _thread_gone(worker), timeout=10, message="the worker thread to exit")
    return box[0]


def test_child_spawned_from_a_short_lived_thread_outlives_the_thread(tmp_path: Path) -> None:
    go = tmp_path / "go"
    log = tmp_path / "child.log"
    proc = _spawn_in_thread([sys.executable, "-c", CHILD, str(go)], log)
    try:
        # The thread is gone, so a thread-bound parent-death SIGKILL has been queued by now; the child
        # must still be able to see "go" (a syscall after the signal would have been delivered).
        go.touch()
        code = proc.wait(timeout=30)
    finally:
        process.stop(proc, sig=signal.SIGKILL, timeout=5)
    assert code == 0, f"child {process_exit(code)}; log: {log.read_text(errors='replace')}"


def process_exit(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with {code} (7: no parent-death signal set)"


def test_child_of_a_thread_dies_when_its_parent_process_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "child.log")],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    child: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent said {line!r} (exit {parent.poll()})"
        child = psutil.Process(int(line))
        assert child.is_running() and child.ppid() == parent.pid  # survived the thread that forked it
        parent.kill()
        parent.wait(timeout=10)

        def child_gone() -> bool:
            try:
                return child.status() == psutil.STATUS_ZOMBIE  # type: ignore[union-attr]
            except psutil.NoSuchProcess:
                return True

        process.wait_until(child_gone, timeout=10, message="the orphaned child to die")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None:
            try:
                child.kill()
            except psutil.Error:
                pass


def test_spawn_from_many_threads_at_once(tmp_path: Path) -> None:
    results: list[subprocess.Popen[bytes]] = []
    lock = threading.Lock()

    def start(index: int) -> None:
        proc = process.spawn([sys.executable, "-c", f"print({index})"], log_path=tmp_path / f"{index}.log")
        with lock:
            results.append(proc)

    workers = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert len(results) == 6
    assert [proc.wait(timeout=30) for proc in results] == [0] * 6
    assert sorted(int((tmp_path / f"{i}.log").read_text()) for i in range(6)) == list(range(6))


@pytest.mark.parametrize("in_thread", [False, True])
def test_spawn_errors_reach_the_caller(tmp_path: Path, in_thread: bool) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            process.spawn([str(tmp_path / "no-such-program")], log_path=tmp_path / "x.log")
        except BaseException as exc:  # recorded and checked below
            errors.append(exc)

    if in_thread:
        worker = threading.Thread(target=start)
        worker.start()
        worker.join(timeout=30)
    else:
        start()
    assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError)
    # and the spawner keeps working after a failure
    ok = process.spawn([sys.executable, "-c", "pass"], log_path=tmp_path / "ok.log")
    assert ok.wait(timeout=30) == 0


def test_spawn_works_in_a_forked_child(tmp_path: Path) -> None:
    """After os.fork the spawner thread does not exist in the child: it must start a new one."""
    process.spawn([sys.executable, "-c", "pass"], log_path=tmp_path / "warm.log").wait(timeout=30)
    script = f"""
import os, sys
from pathlib import Path
from pms import process
process.spawn([sys.executable, "-c", "pass"], log_path=Path({str(tmp_path / 'a.log')!r})).wait()
pid = os.fork()
if pid == 0:
    code = process.spawn([sys.executable, "-c", "print('from fork')"],
                         log_path=Path({str(tmp_path / 'b.log')!r})).wait(timeout=30)
    os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.log").read_text() == "from fork\n"


# -- log rotation ----------------------------------------------------------------------------------

WRITER = """
import os, sys, time
sys.stdout.write(("x" * 99 + "\\n") * 1000)
sys.stdout.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print("after rotation", flush=True)
"""


def test_rotation_lets_a_running_writer_go_on_from_offset_zero(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    go = tmp_path / "go"
    proc = process.spawn([sys.executable, "-c", WRITER, str(go)], log_path=log)
    try:
        process.wait_until(lambda: log.exists() and log.stat().st_size >= 100_000, timeout=30,
                           message="the writer's first 100 kB", alive=lambda: proc.poll() is None)
        assert process.rotate_log(log, max_bytes=50_000, backups=2)
        assert log.stat().st_size == 0
        assert (tmp_path / "svc.log.1").read_text() == ("x" * 99 + "\n") * 1000
        go.touch()
        assert proc.wait(timeout=30) == 0
    finally:
        process.stop(proc, sig=signal.SIGKILL, timeout=5)
    # O_APPEND: the writer continued at the new end, so no hole of NUL bytes where the old content was.
    assert log.read_bytes() == b"after rotation\n"
    assert not process.rotate_log(log, max_bytes=50_000, backups=2)  # under the limit: untouched


def test_rotation_keeps_only_the_configured_number_of_copies(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    assert not process.rotate_log(log, max_bytes=10, backups=2)  # no file yet: nothing to do
    for generation in range(4):
        log.write_text(f"generation {generation}\n")
        assert process.rotate_log(log, max_bytes=10, backups=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]
    assert (tmp_path / "svc.log.1").read_text() == "generation 3\n"
    assert (tmp_path / "svc.log.2").read_text() == "generation 2\n"
    assert log.read_text() == ""
    log.write_text("generation 4\n")
    assert process.rotate_log(log, max_bytes=10, backups=0)  # no copies: truncate only
    assert log.read_text() == "" and (tmp_path / "svc.log.1").read_text() == "generation 3\n"


def test_logs_and_their_copies_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    old = tmp_path / "old.log"
    old.write_text("x" * 100)
    old.chmod(0o644)  # a log from before: made private on the next spawn
    for log in (tmp_path / "logs" / "svc.log", old):
        proc = process.spawn([sys.executable, "-c", "print('y' * 100)"], log_path=log)
        assert proc.wait(timeout=30) == 0
        assert process.rotate_log(log, max_bytes=10, backups=1)
        for path in (log, log.with_name(log.name + ".1")):
            assert path.stat().st_mode & 0o777 == 0o600, path
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "old.log.1").read_text() == "x" * 100 + "y" * 100 + "\n"


def test_an_older_log_folder_and_copies_become_private_too(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    for name in ("svc.log", "svc.log.1", "svc.log.2"):
        (logs / name).write_text("z" * 100)
        (logs / name).chmod(0o644)
    proc = process.spawn([sys.executable, "-c", "pass"], log_path=logs / "svc.log")
    assert proc.wait(timeout=30) == 0
    assert process.rotate_log(logs / "svc.log", max_bytes=10, backups=3)
    assert logs.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in logs.iterdir()} == {
        "svc.log": 0o600, "svc.log.1": 0o600, "svc.log.2": 0o600, "svc.log.3": 0o600}


def test_parent_pid_check_kills_a_child_whose_parent_is_already_gone() -> None:
    """The pre-exec hook's race guard: with a parent pid that is not ours, the child kills itself."""
    hook_pid = os.getpid() + 10_000_000  # never a real parent
    proc = subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=process._die_with(hook_pid))
    assert proc.wait(timeout=30) == -signal.SIGKILL
