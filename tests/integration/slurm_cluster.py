"""A private, throw-away single-node SLURM cluster for integration tests.

``LocalSlurm`` starts, inside a fresh temporary directory, a complete SLURM stack that
shares nothing with any system-wide installation:

    munged      own key, socket, pid/seed/log files          (``munged -F --socket ...``)
    mariadbd    own datadir (``mariadb-install-db``), unix socket and 127.0.0.1 TCP port
    slurmdbd    own slurmdbd.conf (mode 600) next to the private slurm.conf
    slurmctld   ``-D -f slurm.conf``, own StateSaveLocation, ports, log
    slurmd      ``-D -f slurm.conf -N <node>``, own SlurmdSpoolDir, port, log

All daemons run in the foreground as children of the test process (``Popen`` with their
own session and PR_SET_PDEATHSIG=SIGTERM, so a SIGKILLed pytest takes them down too), so
their PIDs are known without pid-file races. ``start()`` waits for each daemon with a real
client probe (munge|unmunge, TCP login to MariaDB, ``sacctmgr show cluster``, ``scontrol
ping``, node ``idle`` in ``sinfo``) and raises ``LocalSlurmError`` with the daemon's log tail
if it exits or is not ready within ``start_timeout``. ``stop()`` cancels the remaining jobs,
sends SIGTERM to each daemon (reverse start order) and SIGKILL after ``stop_timeout``, then
kills stray ``slurmstepd``/job processes whose environment holds this instance's
``SLURM_CONF`` (slurmstepd ignores SIGTERM: it gets SIGKILL after 3 s).

Non-obvious settings (SLURM 22.05):
* ``AuthInfo=socket=...`` is not used for messages to slurmdbd: those are signed through
  the socket named by ``AccountingStoragePass`` (else sacctmgr/slurmctld hit /run/munge).
* ``AuthInfo=...,cred_expire=N`` is also the hold time of a requeued job (default 120 s).
* ``SchedulerParameters=sched_interval=1,bf_interval=1``: without it a requeued job whose
  BeginTime passed waits up to a minute for the next scheduling pass.
* slurmdbd reads ``slurmdbd.conf`` from the directory of ``$SLURM_CONF``; it must be 0600.

Clients find the instance through ``SLURM_CONF`` only (slurm.conf carries
``AuthInfo=socket=<private munge socket>`` and the private ports), see ``env`` /
``run()`` / ``patch_environ()``.

Written for (and tested as) root on Debian 12 (SLURM 22.05, munge 0.5.15, MariaDB
10.11); the packages are installed by ``.ci/install-services.sh``.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

__all__ = ["LocalSlurm", "LocalSlurmError", "REQUIRED_BINARIES", "missing_binaries"]

# Binaries LocalSlurm needs; sbin dirs are searched even if not on PATH.
REQUIRED_BINARIES = (
    "munged", "munge", "unmunge",
    "mariadb-install-db", "mariadbd", "mariadb",
    "slurmdbd", "slurmctld", "slurmd", "slurmstepd",
    "sbatch", "srun", "squeue", "sacct", "sacctmgr", "scontrol", "scancel", "sinfo",
)
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"]
)
# Environment variables that would make clients talk to another cluster / job.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SACCT_", "SINFO_", "SCONTROL_")
_UNIX_PATH_MAX = 107


class LocalSlurmError(RuntimeError):
    """A private SLURM daemon failed to start / a client command failed."""


def which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(_free_port())
    return sorted(ports)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text[-lines:]) or f"<{path} is empty>"


class _Daemon:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path, out: Path):
        self.name, self.proc, self.log, self.out = name, proc, log, out

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def diagnostics(self) -> str:
        parts = [f"--- {self.name} (pid {self.pid}, returncode {self.proc.poll()}) log {self.log}:",
                 _tail(self.log)]
        if self.out != self.log:
            parts += [f"--- {self.name} stdout/stderr {self.out}:", _tail(self.out, 20)]
        return "\n".join(parts)


class LocalSlurm:
    """Private single-node SLURM (+ accounting) in a temp dir. Use as a context manager.

    Parameters
    ----------
    base_dir: parent of the instance directory (default: system temp dir). Unix sockets
        live inside it, so keep it short (munge/mariadb sockets must be < 108 bytes).
    cpus: CPUs of the single node (default ``max(2, os.cpu_count())``).
    job_requeue, kill_wait, min_job_age: the slurm.conf settings of the same name.
    cred_expire: ``AuthInfo=cred_expire=``: job step credential lifetime AND the delay
        before a requeued job may start again (SLURM's default, 120 s, is too slow for tests).
    extra_conf: extra ``slurm.conf`` lines (override earlier keys: last one wins).
    start_timeout: seconds each daemon may take to become ready.
    keep_dir: keep the instance directory (logs) after ``stop()``.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike | None = None,
        *,
        cpus: int | None = None,
        job_requeue: bool = True,
        kill_wait: int = 2,
        min_job_age: int = 300,
        cred_expire: int = 10,
        extra_conf: Sequence[str] | str = (),
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        keep_dir: bool = False,
        debug: str = "info",
    ):
        missing = missing_binaries()
        if missing:
            raise LocalSlurmError(
                f"SLURM/munge/MariaDB binaries missing: {', '.join(missing)} "
                "(install them with: bash .ci/install-services.sh)"
            )
        self.bin = {b: which(b) for b in REQUIRED_BINARIES}
        self.base_dir = base_dir
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.job_requeue = job_requeue
        self.kill_wait = kill_wait
        self.min_job_age = min_job_age
        self.cred_expire = cred_expire
        self.extra_conf = [extra_conf] if isinstance(extra_conf, str) else list(extra_conf)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.keep_dir = keep_dir
        self.debug = debug

        self.user = pwd.getpwuid(os.geteuid()).pw_name  # SlurmUser/SlurmdUser/mariadbd --user
        self.cluster_name = "fscs" + secrets.token_hex(4)  # unique per instance, lowercase
        self.node_name = "n" + self.cluster_name
        self.partition = "debug"
        self.dir: Path | None = None
        self.daemons: list[_Daemon] = []
        self.env: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self.timings: dict[str, float] = {}
        self._last_probe: subprocess.CompletedProcess | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempts: int = 2) -> "LocalSlurm":
        """Start all daemons; returns once the node is idle. Retries once on a port clash."""
        if self.dir is not None:
            raise LocalSlurmError("LocalSlurm already started")
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            self.dir = Path(tempfile.mkdtemp(prefix="slurm-", dir=self.base_dir)).resolve()
            atexit.register(self.stop)
            try:
                self._layout()
                self._step("munged", self._start_munge)
                self._step("mariadbd", self._start_mariadb)
                self._step("slurmdbd", self._start_slurmdbd)
                self._step("slurmctld", self._start_slurmctld)
                self._step("slurmd", self._start_slurmd)
                break
            except LocalSlurmError as e:
                self.stop()
                # Free ports are picked before the daemons bind them: another process may win.
                if attempt == attempts or "address already in use" not in str(e).lower():
                    raise
            except BaseException:
                self.stop()
                raise
        self.startup_seconds = round(time.monotonic() - t0, 2)
        return self

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        t = time.monotonic()
        fn()
        self.timings[name] = round(time.monotonic() - t, 2)

    def stop(self) -> None:
        """Cancel jobs, stop all daemons by PID (TERM, then KILL), clean the temp dir."""
        if self.dir is None:
            return
        atexit.unregister(self.stop)
        if any(d.name == "slurmctld" and d.alive() for d in self.daemons):
            self._cancel_all_jobs()
        for d in reversed(self.daemons):
            self._terminate(d)
        self._kill_strays()
        self.daemons = []
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    # ------------------------------------------------------------------ client helpers
    @property
    def slurm_conf(self) -> Path:
        assert self.dir is not None, "LocalSlurm not started"
        return self.dir / "etc" / "slurm.conf"

    def client_environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) without foreign SLURM_* vars, plus ``self.env``."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(_FOREIGN_ENV_PREFIXES)}
        env.update(self.env)
        return env

    def patch_environ(self, monkeypatch) -> None:
        """Point in-process clients (e.g. submitit) at this cluster via pytest's monkeypatch."""
        for k in list(os.environ):
            if k.startswith(_FOREIGN_ENV_PREFIXES) and k not in self.env:
                monkeypatch.delenv(k, raising=False)
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)

    def run(self, cmd: str | Sequence[str], *, check: bool = True, timeout: float = 60.0,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a client command (list, or a string split with shlex) against this cluster."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        if argv and argv[0] in self.bin and self.bin[argv[0]]:
            argv[0] = self.bin[argv[0]]
        env = self.client_environ(kwargs.pop("env", None))
        try:
            res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL, **kwargs)
        except subprocess.TimeoutExpired as e:
            raise LocalSlurmError(
                f"timed out after {timeout}s: {shlex.join(argv)}\n{self.diagnostics()}") from e
        if check and res.returncode != 0:
            raise LocalSlurmError(
                f"command failed (rc={res.returncode}): {shlex.join(argv)}\n"
                f"stdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}"
            )
        return res

    def sbatch(self, *args: str, timeout: float = 30.0) -> str:
        """``sbatch --parsable ARGS`` -> job id."""
        out = self.run(["sbatch", "--parsable", *args], timeout=timeout).stdout.strip()
        return out.split(";")[0]

    def sacct_state(self, job_id: str) -> str | None:
        """State of the job allocation as recorded by accounting (None if unknown yet)."""
        res = self.run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State"], check=False)
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        return lines[-1].split()[0] if lines else None

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` parsed into a dict ({} if the controller forgot it)."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        info: dict[str, str] = {}
        for tok in res.stdout.split():
            k, sep, v = tok.partition("=")
            if sep and k not in info:
                info[k] = v
        return info

    def wait_for(self, predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.25,
                 what: str = "condition") -> object:
        """Poll ``predicate`` until truthy; LocalSlurmError (with daemon logs) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise LocalSlurmError(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics()}")
            self._check_daemons_alive()
            time.sleep(interval)

    def wait_job_state(self, job_id: str, states: str | Sequence[str], timeout: float = 60.0) -> str:
        """Wait until ``sacct`` reports one of ``states`` for the job; returns it."""
        wanted = {states} if isinstance(states, str) else set(states)
        last: list[str | None] = [None]

        def probe():
            last[0] = self.sacct_state(job_id)
            return last[0] in wanted

        try:
            self.wait_for(probe, timeout=timeout, what=f"job {job_id} in {sorted(wanted)}")
        except LocalSlurmError as e:
            raise LocalSlurmError(f"job {job_id}: last sacct state {last[0]!r}; {e}") from None
        return last[0]  # type: ignore[return-value]

    def diagnostics(self) -> str:
        return "\n".join(d.diagnostics() for d in self.daemons)

    # ------------------------------------------------------------------ setup
    def _layout(self) -> None:
        d = self.dir
        assert d is not None
        # munged wants its socket dir (and every ancestor) searchable by all and nothing on its
        # paths group/world-writable (mkdtemp gives 0700: too strict for the socket).
        os.chmod(d, 0o755)
        for sub in ("etc", "log", "run", "munge", "db", "state", "spool", "tmp"):
            (d / sub).mkdir()
            os.chmod(d / sub, 0o755)
        self.munge_socket = d / "munge" / "munge.socket"
        self.db_socket = d / "run" / "mysqld.sock"
        for sock in (self.munge_socket, self.db_socket):
            if len(str(sock)) > _UNIX_PATH_MAX:
                raise LocalSlurmError(f"unix socket path too long ({len(str(sock))} bytes): {sock}; "
                                      "use a shorter base_dir")
        (self.ctld_port, self.slurmd_port, self.dbd_port, self.db_port) = _free_ports(4)
        self.db_user, self.db_pass = "slurm", secrets.token_hex(12)
        self.env = {"SLURM_CONF": str(self.slurm_conf)}
        self._write_configs()

    def _write_configs(self) -> None:
        d = self.dir
        assert d is not None
        mem_mb = max(1, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2**20 - 512)
        plugstack = d / "etc" / "plugstack.conf"
        plugstack.write_text("")  # don't read /etc/slurm/plugstack.conf
        conf = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            f"SlurmUser={self.user}",
            f"SlurmdUser={self.user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire (default 120 s) is also how long a requeued job waits before it can start again.
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            f"SlurmctldDebug={self.debug}",
            f"SlurmdDebug={self.debug}",
            f"PlugStackConfig={plugstack}",
            f"TmpFS={d / 'tmp'}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Retry pending jobs every second (defaults 60/30 s): a requeued job becomes eligible
            # after cred_expire but nothing else would trigger a scheduling pass.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SlurmdParameters=config_overrides",  # never drain the node over hw mismatch
            "ReturnToService=2",
            f"JobRequeue={1 if self.job_requeue else 0}",
            f"KillWait={self.kill_wait}",
            f"MinJobAge={self.min_job_age}",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MailProg=/bin/true",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.dbd_port}",
            # Messages to slurmdbd are signed with the munge socket named here, not AuthInfo.
            f"AccountingStoragePass={self.munge_socket}",
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname().split('.')[0]} "
            f"CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            *self.extra_conf,
        ]
        self.slurm_conf.write_text("\n".join(conf) + "\n")
        # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; must be 0600, owned by SlurmUser.
        dbd = [
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={self.dbd_port}",
            f"SlurmUser={self.user}",
            f"LogFile={d / 'log' / 'slurmdbd.log'}",
            f"PidFile={d / 'run' / 'slurmdbd.pid'}",
            f"DebugLevel={self.debug}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={self.db_port}",
            f"StorageUser={self.db_user}",
            f"StoragePass={self.db_pass}",
            "StorageLoc=slurm_acct_db",
        ]
        dbd_conf = d / "etc" / "slurmdbd.conf"
        fd = os.open(dbd_conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(dbd) + "\n")
        my_cnf = [
            "[client]",
            f"socket={self.db_socket}",
            "[mariadbd]",
            f"datadir={d / 'db'}",
            f"socket={self.db_socket}",
            f"port={self.db_port}",
            "bind-address=127.0.0.1",
            f"pid-file={d / 'run' / 'mariadbd.pid'}",
            f"log-error={d / 'log' / 'mariadbd.log'}",
            f"tmpdir={d / 'tmp'}",
            f"user={self.user}",
            "skip-name-resolve",
            "performance-schema=OFF",
            "innodb-buffer-pool-size=64M",
            "innodb-log-file-size=16M",
            "innodb-flush-log-at-trx-commit=0",
            "innodb-doublewrite=0",
            "innodb-lock-wait-timeout=900",  # slurmdbd's recommendation
            "max-connections=100",
        ]
        self.my_cnf = d / "etc" / "my.cnf"
        self.my_cnf.write_text("\n".join(my_cnf) + "\n")

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, argv: Sequence[str], log: Path,
               env: Mapping[str, str] | None = None) -> _Daemon:
        assert self.dir is not None
        out = self.dir / "log" / f"{name}.out"
        full_env = self.client_environ()
        if env:
            full_env.update(env)
        with open(out, "ab") as fh:
            proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, cwd=self.dir, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        daemon = _Daemon(name, proc, log, out)
        self.daemons.append(daemon)
        return daemon

    def _wait_ready(self, daemon: _Daemon, probe: Callable[[], bool], what: str,
                    timeout: float | None = None) -> None:
        timeout = self.start_timeout if timeout is None else timeout
        self._last_probe = None
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            if not daemon.alive():
                raise LocalSlurmError(f"{daemon.name} exited (rc={daemon.proc.returncode}) before {what}\n"
                                      f"{daemon.diagnostics()}")
            try:
                if probe():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                last = self._last_probe
                detail = (f"last probe: {shlex.join(last.args)} -> rc={last.returncode}\n"
                          f"{(last.stdout + last.stderr).strip()[-2000:]}\n") if last is not None else ""
                raise LocalSlurmError(f"{daemon.name} not ready ({what}) after {timeout:.0f}s\n"
                                      f"{detail}{daemon.diagnostics()}")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.5)

    def _quiet(self, argv: Sequence[str], timeout: float = 10.0, env: Mapping[str, str] | None = None,
               input: str | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                             env=self.client_environ() if env is None else env,
                             stdin=None if input is not None else subprocess.DEVNULL)
        self._last_probe = res
        return res

    def _start_munge(self) -> None:
        d = self.dir
        assert d is not None
        key = d / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))
        log = d / "log" / "munged.log"
        daemon = self._spawn("munged", [
            self.bin["munged"], "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--log-file={log}", f"--pid-file={d / 'run' / 'munged.pid'}",
            f"--seed-file={d / 'munge' / 'munged.seed'}", "--num-threads=4",
        ], log)

        def probe() -> bool:
            cred = self._quiet([self.bin["munge"], "-n", "-S", str(self.munge_socket)], timeout=5)
            if cred.returncode != 0:
                return False
            return self._quiet([self.bin["unmunge"], "-S", str(self.munge_socket)], timeout=5,
                               input=cred.stdout).returncode == 0

        self._wait_ready(daemon, probe, "munge/unmunge round trip")

    def _start_mariadb(self) -> None:
        d = self.dir
        assert d is not None
        log = d / "log" / "mariadbd.log"
        try:
            res = subprocess.run(
                [self.bin["mariadb-install-db"], f"--defaults-file={self.my_cnf}",
                 "--auth-root-authentication-method=socket", "--skip-test-db"],
                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=d)
        except subprocess.TimeoutExpired as e:
            raise LocalSlurmError(f"mariadb-install-db timed out\n{_tail(log)}") from e
        if res.returncode != 0:
            raise LocalSlurmError(f"mariadb-install-db failed (rc={res.returncode}):\n"
                                  f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{_tail(log)}")
        init = d / "etc" / "init.sql"
        init.write_text(
            f"CREATE USER IF NOT EXISTS '{self.db_user}'@'127.0.0.1' IDENTIFIED BY '{self.db_pass}';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO '{self.db_user}'@'127.0.0.1';\n"
            "FLUSH PRIVILEGES;\n"
        )
        daemon = self._spawn("mariadbd", [self.bin["mariadbd"], f"--defaults-file={self.my_cnf}",
                                          f"--init-file={init}"], log)
        probe_cmd = [self.bin["mariadb"], "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1",
                     "-P", str(self.db_port), "-u", self.db_user, f"-p{self.db_pass}",
                     "--connect-timeout=2", "-e", "SELECT 1"]
        self._wait_ready(daemon, lambda: self._quiet(probe_cmd, timeout=5).returncode == 0,
                         "TCP login of the slurm DB user")

    def _start_slurmdbd(self) -> None:
        d = self.dir
        assert d is not None
        daemon = self._spawn("slurmdbd", [self.bin["slurmdbd"], "-D"], d / "log" / "slurmdbd.log")
        # slurmdbd creates its tables before it listens; sacctmgr fails until then.
        show = [self.bin["sacctmgr"], "-n", "-P", "show", "cluster"]
        self._wait_ready(daemon, lambda: self._quiet(show, timeout=10).returncode == 0,
                         "sacctmgr show cluster")
        res = self._quiet([self.bin["sacctmgr"], "-i", "add", "cluster", self.cluster_name], timeout=30)
        if res.returncode != 0:
            raise LocalSlurmError(f"sacctmgr add cluster {self.cluster_name} failed: "
                                  f"{res.stdout}{res.stderr}\n"
                                  f"{daemon.diagnostics()}")

    def _start_slurmctld(self) -> None:
        d = self.dir
        assert d is not None
        daemon = self._spawn("slurmctld", [self.bin["slurmctld"], "-D", "-i", "-f", str(self.slurm_conf)],
                             d / "log" / "slurmctld.log")
        self._wait_ready(
            daemon,
            lambda: "UP" in self._quiet([self.bin["scontrol"], "ping"], timeout=10).stdout,
            "scontrol ping")

    def _start_slurmd(self) -> None:
        d = self.dir
        assert d is not None
        daemon = self._spawn(
            "slurmd", [self.bin["slurmd"], "-D", "-f", str(self.slurm_conf), "-N", self.node_name],
            d / "log" / "slurmd.log")
        sinfo = [self.bin["sinfo"], "-h", "-N", "-n", self.node_name, "-o", "%T"]

        def probe() -> bool:
            state = self._quiet(sinfo, timeout=10).stdout.strip().lower()
            if state.rstrip("*") in ("down", "drained", "draining") and daemon.alive():
                # e.g. a stale "down" reason: the node registered, bring it back.
                self._quiet([self.bin["scontrol"], "update", f"NodeName={self.node_name}", "State=RESUME"])
            return state == "idle"

        self._wait_ready(daemon, probe, f"node {self.node_name} idle in sinfo")

    # ------------------------------------------------------------------ teardown
    def _cancel_all_jobs(self) -> None:
        try:
            self._quiet([self.bin["scancel"], "--full", f"--partition={self.partition}"], timeout=10)
            deadline = time.monotonic() + max(5.0, self.kill_wait + 5.0)
            while time.monotonic() < deadline:
                res = self._quiet([self.bin["squeue"], "-h", "-t", "R,CG,S,PD", "-o", "%i"], timeout=10)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.25)
        except (OSError, subprocess.SubprocessError):
            pass

    def _terminate(self, d: _Daemon) -> None:
        if d.alive():
            try:
                d.proc.send_signal(signal.SIGTERM)
                d.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                d.proc.kill()
            except ProcessLookupError:
                pass
        try:
            d.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            pass

    def _kill_strays(self) -> None:
        """Kill leftover slurmstepd/job processes that belong to this instance (by env)."""
        marker = f"SLURM_CONF={self.slurm_conf}".encode()
        me = os.getpid()
        victims = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        victims.append(int(entry.name))
            except OSError:
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for pid in victims:
                try:
                    os.kill(pid, sig)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            if not alive or sig == signal.SIGKILL:
                break
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                                      not _is_zombie(p) for p in alive):
                time.sleep(0.1)
            victims = alive

    def _check_daemons_alive(self) -> None:
        dead = [d for d in self.daemons if not d.alive()]
        if dead:
            raise LocalSlurmError("daemon(s) died: " + ", ".join(d.name for d in dead) + "\n"
                                  + "\n".join(d.diagnostics() for d in dead))


def _die_with_parent() -> None:
    """In the forked child: get SIGTERM if the parent (thread) that started us dies, so a
    killed pytest does not leave daemons behind (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
