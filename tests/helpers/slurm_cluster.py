"""A one-node SLURM cluster on loopback for the tests (munge, slurmctld, slurmd).

Installs Debian's slurm-wlm and munge when missing (root and apt-get needed, else the caller
skips), writes a slurm.conf with free ports and a job-completion log (no accounting database),
starts the daemons it needs and stops the ones it started.
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
    def __init__(self, folder: Path):
        self.folder = Path(folder)
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
        for sub in ("state", "spool"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=sepentest",
            # configless: slurmd fetches the config from slurmctld and client commands inside
            # jobs (srun, with SLURM_* variables stripped by Snakemake's jobstep) read its cache
            "SlurmctldParameters=enable_configless",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.port}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={f}/state",
            f"SlurmdSpoolDir={f}/spool",
            f"SlurmctldPidFile={f}/slurmctld.pid",
            f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmctldLogFile={f}/slurmctld.log",
            f"SlurmdLogFile={f}/slurmd.log",
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
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
            f"RealMemory={_memory_mb()} State=UNKNOWN",
            "PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
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
        for cmd, pid in (
            (["slurmctld", "-f", str(self.conf)], "slurmctld.pid"),
            (
                ["slurmd", "--conf-server", f"127.0.0.1:{self.port}", "-N", "localhost"],
                "slurmd.pid",
            ),
        ):
            subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=60)
            self.started.append(self.folder / pid)
            time.sleep(1)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                return self
            time.sleep(1)
        raise Unavailable(f"the local SLURM node did not become idle (state {state!r})")

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
