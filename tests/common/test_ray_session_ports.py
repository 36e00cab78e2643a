"""A dry run on its private Ray listens on loopback only: Ray's own ports, the metrics endpoint, the learner's."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _tree(root: psutil.Process) -> set[int]:
    try:
        return {root.pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _listening(pids: set[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of ``pids``."""
    return {
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.mark.slow
def test_dry_run_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # the private Ray, whatever the shell says
    cmd = [sys.executable, "-m", "rollout", "--dry-run", f"run.output_dir={tmp_path}", "run.steps=2",
           "run.validate_every=1", "run.sample_grid=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, seen, names = psutil.Process(proc.pid), set(), {}
    try:
        while proc.poll() is None:  # sample the whole process tree until the run ends
            for address, port, pid in _listening(_tree(root)):
                seen.add((address, port))
                with contextlib.suppress(psutil.NoSuchProcess):
                    names[(address, port)] = psutil.Process(pid).name()
            time.sleep(0.5)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert len(seen) >= 5, f"too few listeners seen to mean anything: {seen}"  # GCS, raylet, workers, agents, ...
    exposed = sorted((a, p, names.get((a, p), "?")) for a, p in seen if not _loopback(a))
    # The gloo rendezvous store of learner rank 0 included (learner/rendezvous.py binds it to loopback).
    assert exposed == [], f"listening beyond loopback: {exposed}"
