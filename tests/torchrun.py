"""`torchrun` for tests: launches `python -m torch.distributed.run` in its own process group and,
if it runs past its time, kills the whole group, workers included (a plain subprocess timeout
kills only torchrun's agent and leaves its workers running, waiting for each other)."""

import os
import signal
import subprocess
import sys


def run_torchrun(args: list[str], *, env: dict, nproc: int = 2, timeout: int = 300):
    """`torchrun --standalone --nproc_per_node nproc *args`; the finished process, output kept."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(nproc), *args]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
