"""A real Slurm cluster on this machine, for tests of the Slurm launcher.

``slurmctld`` plus two ``slurmd`` "nodes" (``n1``, ``n2``) on one host, as measured with
Debian's slurm-wlm 22.05 and munge (shared notes: slurm-local.md). Slurm and munge are
installed with apt-get when missing. Everything the cluster writes lies under one folder;
every daemon started here is stopped by its PID at the end, and a munged that was already
running is left alone. Only the standard library is used, so the harness also runs from a
plain ``python3``.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from nemo_upcycle.platform.launcher_env import standalone_env

NODES = ("n1", "n2")
PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("sbatch", "srun", "scontrol", "sinfo", "slurmctld", "slurmd", "munged", "munge", "unmunge")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
MUNGE_KEY = Path("/etc/munge/munge.key")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# nemo-upcycle local Slurm"


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here: the only reason to skip."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but the cluster did not come up (the message holds the daemon logs)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _services_kept_down() -> Iterator[None]:
    """Debian packages start their daemons on install unless policy-rc.d says no (Docker images
    ship one); a daemon started by the package would be nobody's to stop."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink()


def ensure_installed(timeout_s: float = 900) -> float:
    """Install Slurm and munge with apt-get when any of their programs is missing; return the
    seconds the install took (0 when nothing was missing). Raises :class:`SlurmUnavailable`."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return 0.0
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} missing and apt-get as root is not available to install "
                               f"{' '.join(PACKAGES)}")
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with _services_kept_down():
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f}s") from None
            if done.returncode != 0:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n"
                                       f"{_tail(done.stdout + done.stderr)}")
    still = [b for b in BINARIES if shutil.which(b) is None]
    if still:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(still)} still missing")
    return time.monotonic() - start


def _munge_works() -> bool:
    """A credential encoded and decoded through the running munged's socket."""
    try:
        encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if encoded.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _start_munged(log: Path) -> Optional[subprocess.Popen]:
    """None when a working munged already runs (not ours: left alone), else the one started."""
    if _munge_works():
        return None
    if not MUNGE_KEY.is_file() or MUNGE_KEY.stat().st_size == 0:
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        MUNGE_KEY.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    # In the foreground so that its PID is ours to stop; --force: it runs as root here.
    proc = subprocess.Popen(["munged", "--foreground", "--force"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _munge_works():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    _stop(proc)
    raise SlurmStartError(f"munged did not start (exit {proc.poll()}):\n{_tail(log.read_text(errors='replace'))}")


def _stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


@contextlib.contextmanager
def _node_names_resolved(names: tuple[str, ...]) -> Iterator[None]:
    """Ranks rendezvous at the first node's name (the template's MASTER_ADDR), so every node
    name must resolve; names missing from /etc/hosts are added for the cluster's lifetime."""
    missing = [n for n in names if not _resolves_to_loopback(n)]
    if not missing:
        yield
        return
    line = f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n"
    text = HOSTS_FILE.read_text()
    HOSTS_FILE.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)
    try:
        yield
    finally:
        HOSTS_FILE.write_text("".join(l for l in HOSTS_FILE.read_text().splitlines(keepends=True) if l != line))


def slurm_conf(root: Path, ctld_port: int, node_ports: dict[str, int], cpus: int, first_job_id: int) -> str:
    nodes = "\n".join(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                      f"RealMemory=10000 State=UNKNOWN" for name, port in node_ports.items())
    return f"""\
ClusterName=local
FirstJobId={first_job_id}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/d-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=10
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running cluster: submit with :meth:`sbatch`, wait with :meth:`wait`."""

    root: Path
    conf: Path
    nodes: tuple[str, ...]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, base: Optional[dict] = None) -> dict:
        # This cluster's clients and daemons only: no Slurm job this process runs in leaks in.
        return standalone_env(base, SLURM_CONF=str(self.conf))

    def command(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout_s)

    def sbatch(self, args: list[str], cwd: Path, env: Optional[dict] = None) -> str:
        """Submit; return the job id."""
        done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=self.env(env),
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record as ``scontrol show job`` states it (accounting is off)."""
        done = self.command("scontrol", "-o", "show", "job", job_id)
        if done.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id}: {done.stderr}")
        return dict(re.findall(r"(\S+?)=(\S*)", done.stdout))

    def wait(self, job_ids: list[str], timeout_s: float) -> dict[str, dict[str, str]]:
        """Each job's final record; on timeout the jobs are cancelled and their outputs shown."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = {j: self.job(j) for j in job_ids}
            if all(r.get("JobState") in TERMINAL_STATES for r in records.values()):
                return records
            if time.monotonic() > deadline:
                self.command("scancel", *job_ids)
                raise AssertionError(f"jobs {job_ids} did not finish within {timeout_s:.0f}s "
                                     f"(cancelled)\n{self.outputs(records)}\n{self.logs()}")
            time.sleep(1)

    @staticmethod
    def outputs(records: dict[str, dict[str, str]], lines: int = 40) -> str:
        parts = []
        for job_id, record in records.items():
            out = Path(record.get("StdOut", ""))
            text = _tail(out.read_text(errors="replace"), lines) if out.is_file() else "(no output file)"
            parts.append(f"--- job {job_id} ({record.get('JobState')}) {out} ---\n{text}")
        return "\n".join(parts)

    def logs(self, lines: int = 20) -> str:
        """The daemons' logs (``*.log``) and what each printed before it had one (``*.out``)."""
        parts = []
        for log in sorted((self.root / "log").iterdir()):
            parts.append(f"--- {log.name} ---\n{_tail(log.read_text(errors='replace'), lines)}")
        return "\n".join(parts)

    def node_states(self) -> dict[str, str]:
        done = self.command("sinfo", "-h", "-N", "-o", "%N %t")
        return dict(line.split() for line in done.stdout.splitlines() if line.strip()) if done.returncode == 0 else {}

    def _wait_until_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            dead = [name for name, p in self.daemons.items() if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        raise SlurmStartError(f"Slurm nodes {self.nodes} not idle within {timeout_s:.0f}s "
                              f"(sinfo: {self.node_states()}; exited daemons: "
                              f"{[n for n, p in self.daemons.items() if p.poll() is not None]})\n{self.logs()}")

    def _cancel_all_jobs(self, timeout_s: float = 60) -> None:
        """Jobs still running would outlive their slurmd (slurmstepd detaches)."""
        self.command("scancel", "--partition=debug")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            queue = self.command("squeue", "-h", "-o", "%i")
            if queue.returncode != 0 or not queue.stdout.strip():
                return
            time.sleep(0.5)


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextlib.contextmanager
def local_slurm(root: Path, nodes: tuple[str, ...] = NODES, cpus_per_node: int = 2,
                start_timeout_s: float = 90) -> Iterator[LocalSlurm]:
    """Install if needed, start munged (unless one runs), slurmctld and one slurmd per node,
    wait until every node is idle; stop every daemon started here on exit."""
    ensure_installed()
    root = Path(root)
    (root / "log").mkdir(parents=True, exist_ok=True)
    (root / "ctld").mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    # Job ids (and so the template's rendezvous ports) unlike those of another cluster
    # started the same way on this machine.
    first_job_id = random.randrange(1000, 19000)
    conf.write_text(slurm_conf(root, _free_port(), {n: _free_port() for n in nodes}, cpus_per_node, first_job_id))
    cluster = LocalSlurm(root=root, conf=conf, nodes=nodes)
    env = cluster.env()
    with _node_names_resolved(nodes):
        munged = _start_munged(root / "log" / "munged.log")
        if munged is not None:
            cluster.daemons["munged"] = munged
        try:
            # -D: in the foreground, so that each PID is the daemon's own; -i: a fresh state.
            cluster.daemons["slurmctld"] = _start(["slurmctld", "-D", "-i", "-f", str(conf)],
                                                  root / "log" / "slurmctld.out", env)
            for node in nodes:
                cluster.daemons[f"slurmd-{node}"] = _start(["slurmd", "-D", "-f", str(conf), "-N", node],
                                                           root / "log" / f"slurmd-{node}.out", env)
            cluster._wait_until_idle(start_timeout_s)
            yield cluster
        finally:
            if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
                cluster._cancel_all_jobs()
            # slurmd first, then the controller, munged last (the others use it while stopping).
            for name in sorted(cluster.daemons, key=lambda n: (n == "munged", n == "slurmctld")):
                _stop(cluster.daemons[name])
