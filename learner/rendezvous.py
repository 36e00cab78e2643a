"""The rendezvous of a learner group: a ``torch.distributed`` store that listens where it is told to.

``env://`` initialisation lets rank 0's ``TCPStore`` bind every interface of its node, whatever
``MASTER_ADDR`` says.  A store built on a socket bound here listens on that one address: loopback for a
one-node group, the node's cluster IP for a group that spans nodes.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist


def rendezvous_store(rank: int, world_size: int, host: str, port: int, timeout: timedelta) -> dist.TCPStore:
    """The group's ``TCPStore``: rank 0 serves it on ``host:port`` alone, the other ranks connect to it.

    ``timeout`` bounds every store operation (joining included), as ``env://`` would set it.
    """
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6, as ``host`` is
    descriptor = socket.create_server((host, port), family=family).detach()
    try:  # from here on the store's server owns the descriptor (libuv closes it with the server)
        return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=descriptor)
    except BaseException:
        os.close(descriptor)
        raise
