"""Ray clusters of our own for tests: `ray start --block` nodes on 127.0.0.1, stopped with their process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def ray_env() -> dict[str, str]:
    """The environment for `ray start`, `ray job submit` and drivers: one auth mode for all of them."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # A private local Ray started earlier in this test process (common.ray_session) sets this to 0, which
    # makes `ray start --address` refuse to add a node: these clusters are our own, multi-node ones.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    # The `ray` command of this interpreter's environment, also when that environment is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def agent_port_args() -> list[str]:
    """Free ports for a node's agents and metrics, so that nodes on one machine do not collide."""
    agent, agent_grpc, runtime_env, metrics = free_ports(4)
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]  # fmt: skip


def start_node(args: Sequence[str], log: Path, *, cwd: Path | None = None) -> subprocess.Popen:
    """``ray start --block --node-ip-address=127.0.0.1 ARGS``; `--block` ties the node's processes to this one."""
    handle = open(log, "w")  # noqa: SIM115 - the child holds it; closed when the node stops
    return subprocess.Popen(
        ["ray", "start", "--block", "--node-ip-address=127.0.0.1", *args], env=ray_env(), cwd=cwd,
        start_new_session=True, stdout=handle, stderr=subprocess.STDOUT,
    )  # fmt: skip


def stop_node(node: subprocess.Popen) -> None:
    if node.poll() is not None:  # it failed to start (and took its group with it): nothing to stop
        return
    os.killpg(node.pid, signal.SIGTERM)  # `ray start --block` stops the node it started
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def wait_until(ready, nodes: Sequence[subprocess.Popen], logs: Sequence[Path], what: str, timeout: float = 120) -> None:
    """Poll ``ready()`` until it is true; fail with the nodes' logs if one exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        for node, log in zip(nodes, logs, strict=True):
            assert node.poll() is None, log.read_text()[-4000:]
        time.sleep(2)
    raise AssertionError(f"{what} did not come up in {timeout:.0f} s")
