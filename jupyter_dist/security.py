"""Encrypt the cluster's sockets with CurveZMQ when other hosts can reach them.

Every message is signed with the cluster's key (HMAC) in any case; Curve
adds encryption. The controller makes a key pair when it listens on an
address other than loopback; its public key goes into the connection file
(mode 0600, beside the signing key), its secret key never leaves the
controller. Clients and engines make a key pair of their own per socket.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import zmq

from jupyter_dist.connection_file import ClusterInfo


def is_reachable_from_other_hosts(ip: str) -> bool:
    """Whether an address to listen on is anything but loopback (``localhost`` counts as loopback)."""
    if ip == "localhost":
        return False
    try:
        return not ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return True  # a host name: assume others can reach it


def server_keypair() -> tuple[bytes, bytes]:
    """A new (public, secret) Curve key pair, Z85-encoded."""
    return zmq.curve_keypair()


def secure_server(sock: zmq.Socket[Any], public_key: bytes, secret_key: bytes) -> None:
    """Make a listening socket a Curve server (call before bind)."""
    sock.curve_secretkey = secret_key
    sock.curve_publickey = public_key
    sock.curve_server = True


def secure_client(sock: zmq.Socket[Any], info: ClusterInfo) -> None:
    """Make a connecting socket a Curve client of the cluster, if the cluster uses Curve (before connect)."""
    if not info.curve_public_key:
        return
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = info.curve_public_key.encode()
    sock.curve_publickey = public
    sock.curve_secretkey = secret
