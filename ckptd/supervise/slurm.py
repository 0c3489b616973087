"""``ckptd run --requeue``: hand a preempted SLURM job back to the scheduler.

Under SLURM a preemption notice (``#SBATCH --signal=USR1@120``) means the
allocation ends soon: relaunching on it (local auto-resume) would be killed
with it. So with ``--requeue``, an attempt that ends ``preempted`` (it
checkpointed after the notice and exited) is followed by exactly one
``scontrol requeue $SLURM_JOB_ID``, once its checkpoint is committed, and
local auto-resume is switched off for that attempt. Crashes (``failed``,
``interrupted``) are still auto-resumed inside the allocation when
``--auto-resume`` is given. The requeued job runs the same batch script
again; its ``ckptd run --requeue`` finds the run named after the job
(:func:`run_id_for_job`) and continues it as its next attempt, from the newest
checkpoint. That needs the data home (``CKPTD_HOME``) on storage the requeued
job sees (a shared file system), as SLURM may place it on another node.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

#: How long ``scontrol requeue`` may take.
SCONTROL_TIMEOUT_S = 60.0


def job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job this process runs in (an array task as ``JOB_TASK``), or None."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job or not re.fullmatch(r"[0-9]+", job):
        return None
    array, task = env.get("SLURM_ARRAY_JOB_ID", ""), env.get("SLURM_ARRAY_TASK_ID", "")
    if array.isdigit() and task.isdigit():
        return f"{array}_{task}"
    return job


def run_id_for_job(job: str) -> str:
    """The run a SLURM job's ``ckptd run --requeue`` records into, the same after a requeue."""
    return f"slurm-{job}"


def requeue(job: str) -> str | None:
    """``scontrol requeue JOB``; None when it worked, else why not (one line)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "scontrol is not on PATH"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True,
                              timeout=SCONTROL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"scontrol requeue {job}: {exc}"
    if done.returncode != 0:
        err = (done.stderr or done.stdout).strip().splitlines()
        return f"scontrol requeue {job} exited with status {done.returncode}" + \
            (f": {err[-1]}" if err else "")
    return None


__all__ = ["job_id", "requeue", "run_id_for_job"]
