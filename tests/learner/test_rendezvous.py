"""Rank 0's rendezvous store listens on the address it is given, not on every interface."""

from __future__ import annotations

import functools
import os
import socket
import threading
from datetime import timedelta

import psutil
import torch.distributed as dist

from learner.rendezvous import rendezvous_store

TIMEOUT = timedelta(seconds=60)


def _listeners_on(port: int) -> set[str]:
    """The addresses this process listens on at ``port``."""
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_plain_tcpstore_binds_every_interface():
    """Why the module exists: torch's own server ignores the host name it is given (the check below can see it)."""
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    assert _listeners_on(port) & {"0.0.0.0", "::"}, _listeners_on(port)
    del store


def test_rank_zero_serves_on_the_given_address_only_and_other_ranks_connect():
    port, served = _free_port(), {}
    # Rank 0's constructor waits for the whole group, so it starts in a thread and rank 1 joins here.
    serve = functools.partial(rendezvous_store, 0, 2, "127.0.0.1", port, TIMEOUT)
    server = threading.Thread(target=lambda: served.setdefault("store", serve()))
    server.start()
    client = rendezvous_store(1, 2, "127.0.0.1", port, TIMEOUT)
    server.join(timeout=60)
    assert _listeners_on(port) == {"127.0.0.1"}
    served["store"].set("rank0", "ready")
    assert client.get("rank0") == b"ready"
    del served["store"], client  # the store's server closes the descriptor it was handed
    assert _listeners_on(port) == set()
