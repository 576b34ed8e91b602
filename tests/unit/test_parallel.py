"""ordered_map: input order, bounded read-ahead, worker errors and dead workers."""
from __future__ import annotations

import os
import signal

import pytest

from fscs.errors import FSCSError
from fscs.parallel import ordered_map


def _square(x: int) -> int:
    return x * x


def _fail_at_5(x: int) -> int:
    if x == 5:
        raise FSCSError("item 5 is bad")
    return x


def _die_at_5(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return x


def test_order_and_in_process_path():
    assert list(ordered_map(_square, range(50), 2, chunksize=3)) == [x * x for x in range(50)]
    assert list(ordered_map(_square, range(5), 1)) == [0, 1, 4, 9, 16]


def test_reads_only_a_bounded_window_ahead():
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i

    it = ordered_map(_square, items(), 2, chunksize=4, ahead=2)
    assert next(it) == 0
    assert len(pulled) <= 2 * 2 * 4 + 4  # the submitted window (+ one chunk), not the whole input
    it.close()


def test_worker_error_is_raised_and_a_dead_worker_is_a_one_line_error():
    with pytest.raises(FSCSError, match="item 5 is bad"):
        list(ordered_map(_fail_at_5, range(20), 2, chunksize=2))
    with pytest.raises(FSCSError, match="a test worker process died .* fewer --workers"):
        list(ordered_map(_die_at_5, range(20), 2, chunksize=2, what="test worker"))


def _slow(x: int) -> int:
    import time

    time.sleep(60)
    return x


def test_workers_die_with_a_killed_parent():
    """SIGKILL of the process running ordered_map must not leave its workers running (they held ~300 MB
    each, forever, after a killed `fscs shards synth`)."""
    import subprocess
    import sys
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    script = ("import sys\n"
              f"sys.path.insert(0, {here!r})\n"
              "import test_parallel as t\n"
              "from fscs.parallel import ordered_map\n"
              "next(ordered_map(t._slow, range(8), 2, chunksize=1))\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    kids: list[int] = []
    deadline = time.time() + 30
    while time.time() < deadline and len(kids) < 2:
        time.sleep(0.2)
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        kids = [int(k) for k in out.split()]
    try:
        assert len(kids) >= 2, "the pool's workers did not start"
        proc.kill()
        proc.wait()

        def running(pid: int) -> bool:
            try:
                return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.time() + 10
        while time.time() < deadline and any(running(k) for k in kids):
            time.sleep(0.2)
        alive = [k for k in kids if running(k)]
        assert not alive, f"workers {alive} outlived their killed parent"
    finally:
        proc.kill()
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass


def test_a_worker_whose_parent_died_before_its_initializer_ends_itself():
    """The kernel's parent-death signal only covers a parent that dies after the prctl; a parent killed
    between the fork and the initializer (CI caught one such worker) must be noticed by the re-parented
    worker. Here the "parent" the worker was told about is not its parent at all."""
    import subprocess
    import sys

    script = ("import os\nfrom fscs.parallel import _init_worker\n"
              "_init_worker(int(os.environ['PARENT']))\nprint('survived')\n")
    for parent, survives in ((os.getpid(), True), (-1, False)):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PARENT": str(parent)})
        assert (out.stdout.strip() == "survived") is survives, out.stderr
        assert (out.returncode == 0) is survives


def test_ctrl_c_stops_the_workers_quietly():
    """Ctrl-C signals the terminal's whole process group: each busy worker printed a KeyboardInterrupt
    traceback under the command's one-line "interrupted" message. Now the workers end quietly at once."""
    import subprocess
    import sys
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    script = ("import sys\n"
              f"sys.path.insert(0, {here!r})\n"
              "import test_parallel as t\n"
              "from fscs.parallel import ordered_map\n"
              "try:\n"
              "    list(ordered_map(t._slow, range(8), 2, chunksize=1))\n"
              "except KeyboardInterrupt:\n"
              "    print('interrupted', file=sys.stderr)\n"
              "    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    try:
        kids: list[str] = []
        deadline = time.time() + 30
        while time.time() < deadline and len(kids) < 2:
            time.sleep(0.2)
            found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            kids = found.stdout.split()
        assert len(kids) >= 2, "the pool's workers did not start"
        time.sleep(0.5)  # the workers are inside _slow
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # the workers would sleep 60 s if they ignored Ctrl-C
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert err.strip() == "interrupted", err


def test_workers_of_a_process_that_ignores_ctrl_c_keep_ignoring_it():
    """A background job (`cmd &` in a script) starts with SIGINT ignored: its workers must not start ending
    on a SIGINT their parent ignores."""
    import subprocess
    import sys

    script = ("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "from fscs.parallel import _init_worker\n_init_worker()\n"
              "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
