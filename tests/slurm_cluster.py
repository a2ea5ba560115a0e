"""A real, private Slurm cluster for tests: munged + slurmctld + one or two slurmd's.

Everything lives in one temporary directory: a generated munge key and socket, slurm.conf,
state, spool and logs. Nothing under /etc is used, so it can run beside a system Slurm.

* one node: slurmctld and slurmd on 127.0.0.1 (``slurmd -N`` names the node, whatever the hostname);
* two nodes: Debian's Slurm cannot run two slurmd's on one address, so each node gets its own
  network namespace, the two joined by a veth pair (a bridge pays only from three nodes on);
  addresses exist only inside the namespaces made here. slurmctld and every client command run
  in the first node's namespace. slurmd is started with ``nsenter --net=...``: under
  ``ip netns exec`` it fails on /sys/fs/cgroup.

Slurm settings chosen for tests: proctrack/linuxproc and task/none (no cgroups), no
accounting (``sacct`` says nothing: poll ``squeue``/``scontrol``), ``cred_expire=5`` so a
requeued job restarts after ~6 s instead of 120 s, a scheduler that runs every second.
Every client call is wrapped in ``timeout``: against a dead controller they retry for minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CLIENT_TIMEOUT_S = 20
# Job states after which a job never runs again (a requeued job passes through PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class NamespacesRefused(RuntimeError):
    """This machine does not let us make network namespaces (the two-node cluster needs them)."""


def slurm_available() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (run slurm/dev/install_local_slurm.sh)"
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (SlurmUser=root, munge key ownership)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (kills every daemon it started)."""

    def __init__(self, root: Path, nodes: int = 1) -> None:
        assert nodes in (1, 2)
        self.root = root
        self.nodes = [f"gadn{i + 1}" for i in range(nodes)]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.netns: list[str] = []
        self.addrs = ["127.0.0.1"]
        self.daemons: dict[str, subprocess.Popen] = {}
        # Nothing from a Slurm job the tests may themselves run in: only this cluster's config.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)

    # -- commands --------------------------------------------------------------------------

    def _in_ns(self, argv: list[str], ns: str | None) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", *argv] if ns else argv

    def client(self, *argv: str, check: bool = True, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: int = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, scontrol, ...) against this cluster; ``env`` is added."""
        cmd = self._in_ns(["timeout", str(timeout), *argv], self.netns[0] if self.netns else None)
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout + 5)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit (from ``cwd``, the job's working directory); returns the job id."""
        return int(self.client("sbatch", "--parsable", *argv, env=env, cwd=cwd).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.client("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float, poll_s: float = 1.0) -> dict[str, str]:
        """Poll until the job reaches a final state; returns its last ``scontrol show job``."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
            time.sleep(poll_s)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            if len(self.nodes) == 2:
                self._make_network()
            self._start_munge()
            self._write_conf()
            ns = self.netns[0] if self.netns else None
            self._spawn(self._in_ns(["slurmctld", "-D", "-i", "-f", str(self.conf)], ns), "slurmctld")
            for i, node in enumerate(self.nodes):
                node_ns = self.netns[i] if self.netns else None
                self._spawn(self._in_ns(["slurmd", "-D", "-N", node, "-f", str(self.conf)], node_ns), f"slurmd-{node}")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.daemons:
            self._cancel_all_jobs()
        procs = list(self.daemons.values())[::-1]  # slurmd's, slurmctld, then munged
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.daemons.clear()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.netns.clear()

    def _cancel_all_jobs(self, timeout: float = 30) -> None:
        """Jobs outlive slurmd (slurmstepd runs them): end them while the daemons can still do it."""
        if self.client("scancel", "--partition=debug", check=False, timeout=5).returncode:
            return  # the controller is gone: nothing to ask
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.client("squeue", "-h", "-o", "%i %t", check=False, timeout=5).stdout.strip():
                return
            time.sleep(0.5)

    def _spawn(self, argv: list[str], name: str) -> None:
        with (self.root / f"{name}.out").open("w") as out:
            self.daemons[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True)

    def _died(self, name: str) -> str:
        proc = self.daemons[name]
        tail = (self.root / f"{name}.out").read_text(errors="replace").strip().splitlines()[-5:]
        return f"{name} exited {proc.returncode} (logs in {self.root}): " + " | ".join(tail)

    def _start_munge(self) -> None:
        """A private munged with a fresh key. munged insists on a munge-owned key readable by no one
        else, and on a socket directory every user may traverse (clients run as any user)."""
        mdir = self.munge_socket.parent
        mdir.mkdir()
        mdir.chmod(0o755)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(mdir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        self._spawn(["runuser", "-u", "munge", "--", "munged", "-F", f"--key-file={key}",
                     f"--socket={self.munge_socket}", f"--pid-file={mdir / 'munged.pid'}",
                     f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"], "munged")
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self.daemons["munged"].poll() is not None:
                raise RuntimeError(self._died("munged"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"munged: no socket after 20 s; logs in {self.root}")
            time.sleep(0.1)

    def _make_network(self) -> None:
        """Two namespaces, one veth pair between them: 10.<x>.<y>.1 and .2 on a private /24."""
        tag = f"gad{os.getpid() % 100000}"
        subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.netns = [f"{tag}n1", f"{tag}n2"]
        self.addrs = [f"{subnet}.1", f"{subnet}.2"]
        ifaces = [f"{tag}a", f"{tag}b"]
        for ns in self.netns:
            proc = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, check=False)
            if proc.returncode:
                raise NamespacesRefused(f"ip netns add {ns}: {proc.stderr.strip()}")
        _ip("link", "add", ifaces[0], "netns", self.netns[0], "type", "veth", "peer", "name", ifaces[1],
            "netns", self.netns[1])
        for ns, iface, addr in zip(self.netns, ifaces, self.addrs):
            _ip("-n", ns, "link", "set", "lo", "up")
            # Same name in both namespaces, so one GLOO_SOCKET_IFNAME fits every node.
            _ip("-n", ns, "link", "set", iface, "name", "gadnet0")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "gadnet0")
            _ip("-n", ns, "link", "set", "gadnet0", "up")

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir()
        for node in self.nodes:
            (r / "spool" / node).mkdir()  # slurmd does not create its spool dir
        cpus = os.cpu_count() or 1
        ctl_port, d_port = (6817, 6818) if self.netns else (_free_port(), _free_port())
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory=1000 State=UNKNOWN"
            for n, a in zip(self.nodes, self.addrs)
        )
        # slurmctld runs only where the SlurmctldHost name is this host's, and "localhost" always
        # is; the address in brackets is where the nodes and clients reach it.
        self.conf.write_text(f"""\
ClusterName=gadtest
SlurmctldHost=localhost({self.addrs[0]})
MailProg=/bin/true
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
# A requeued job may start only after cred_expire; then it waits for the next full scheduling
# pass, every 60 s by default: every second here.
SchedulerParameters=sched_interval=1,sched_min_interval=100000
MessageTimeout=5
# SIGTERM -> SIGKILL grace at a time limit or scancel.
KillWait=5
InactiveLimit=0
# Finished jobs stay visible to `scontrol show job` this long (no accounting to ask instead).
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(self._died(name))
            proc = self.client("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=5)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            if states and all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not idle after {timeout:.0f} s: {states or proc.stderr.strip()}; "
                                   f"logs in {self.root}")
            time.sleep(0.3)


def _ip(*argv: str) -> None:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"ip {' '.join(argv)}: {proc.stderr.strip()}")


def make_root() -> Path:
    """A private directory for the cluster; world-traversable so munged (user munge) reaches its socket.
    In /tmp, not $TMPDIR: the tests point that into pytest's directory, which only its owner may enter."""
    root = Path(tempfile.mkdtemp(prefix="gad-slurm-", dir="/tmp"))
    root.chmod(0o755)
    return root
