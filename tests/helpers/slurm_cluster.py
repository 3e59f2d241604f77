"""A SLURM cluster on loopback for the tests (munge, slurmctld, one slurmd per node).

Installs Debian's slurm-wlm and munge when missing (root and apt-get needed, else the caller
skips), writes a slurm.conf with free ports and a job-completion log (no accounting database),
starts the daemons it needs and stops the ones it started. Its nodes (n1, n2, ...) are slurmd
daemons on this one host (`slurmd -N n2`), one port each: a real multi-node cluster for the
scheduler and srun, without a network between the nodes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class Unavailable(RuntimeError):
    """SLURM cannot be had here (no root, no apt-get, install failed)."""


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and apt-get (as root) is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {done.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.8)
    return 4000


class LocalSlurm:
    def __init__(self, folder: Path, nodes: int = 2):
        self.folder = Path(folder)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf = self.folder / "slurm.conf"
        self.jobcomp = self.folder / "jobcomp.txt"
        self.started: list[Path] = []  # pid files of the daemons we started
        self.munged: subprocess.Popen | None = None
        self.port = _free_port()

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        f = self.folder
        for sub in ("state", *(f"spool-{n}" for n in self.nodes)):
            (f / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=sepentest",
            # configless: slurmd fetches the config from slurmctld and client commands inside
            # jobs (srun, with SLURM_* variables stripped by Snakemake's jobstep) read its cache
            "SlurmctldParameters=enable_configless",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={f}/state",
            f"SlurmdSpoolDir={f}/spool-%n",
            f"SlurmctldPidFile={f}/slurmctld.pid",
            f"SlurmdPidFile={f}/slurmd-%n.pid",
            f"SlurmctldLogFile={f}/slurmctld.log",
            f"SlurmdLogFile={f}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "MinJobAge=600",  # finished jobs stay visible to squeue (the status command)
            "JobCompType=jobcomp/filetxt",  # the cluster's own record, no database needed
            f"JobCompLoc={self.jobcomp}",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
        ]
        memory = _memory_mb() // len(self.nodes)  # the host's memory shared by its nodes
        lines += [
            f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
            f"Port={_free_port()} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN"
            for name in self.nodes
        ]
        lines.append(
            f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
        self.munged = subprocess.Popen(
            ["munged", "--foreground", "--force"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)

    def start(self) -> LocalSlurm:
        self.write_conf()
        self._start_munge()
        daemons = [(["slurmctld", "-f", str(self.conf)], "slurmctld.pid")]
        server = ["--conf-server", f"127.0.0.1:{self.port}"]
        daemons += [(["slurmd", *server, "-N", n], f"slurmd-{n}.pid") for n in self.nodes]
        for cmd, pid in daemons:
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                self.stop()
                raise Unavailable(f"{' '.join(cmd)} failed: {done.stderr[-300:]}")
            self.started.append(self.folder / pid)
            time.sleep(1)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.node_states()
            if set(states.values()) == {"idle"} and set(states) == set(self.nodes):
                return self
            time.sleep(1)
        self.stop()
        raise Unavailable(
            f"the local SLURM nodes did not all become idle ({states}); a SLURM built without "
            "--enable-multiple-slurmd runs one slurmd per host, so this host cannot be "
            f"{len(self.nodes)} nodes"
        )

    def node_states(self) -> dict:
        shown = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True
        ).stdout
        return dict(line.split() for line in shown.splitlines() if len(line.split()) == 2)

    def job_record(self, job_id: str) -> dict:
        """The job-completion log's record of a job as key=value pairs."""
        for line in self.jobcomp.read_text().splitlines() if self.jobcomp.is_file() else []:
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields.get("JobId") == str(job_id):
                return fields
        return {}

    def completed_jobs(self) -> list[str]:
        if not self.jobcomp.is_file():
            return []
        return [
            line for line in self.jobcomp.read_text().splitlines() if "JobState=COMPLETED" in line
        ]

    def stop(self) -> None:
        for pid_file in reversed(self.started):
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        if self.munged is not None:
            self.munged.terminate()
            self.munged.wait(timeout=10)
        # configless slurmd links /run/slurm/conf to its cache: a link left behind makes every
        # later SLURM client call (and the Snakemake plugin's start-up check) wait for a
        # controller that is gone
        link = Path("/run/slurm/conf")
        if link.is_symlink() and str(self.folder) in os.readlink(link):
            link.unlink()
