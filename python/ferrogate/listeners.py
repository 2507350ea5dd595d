"""Listening sockets, created by the master and inherited by the workers."""

import socket

from ferrogate.addresses import join_host_port, split_host_port

BACKLOG = 4096


def open_listener(address: str) -> socket.socket:
    """A bound, listening, inheritable TCP socket for ``host:port``. Raises OSError."""
    host, port = split_host_port(address, allow_port_zero=True)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A restart must not wait for TIME_WAIT connections of the previous master.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::]:80 means IPv6 only; 0.0.0.0:80 can then be listed as well.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def local_url(sock: socket.socket) -> str:
    """``http://host:port`` of a listening socket, with the port actually bound."""
    host, port = sock.getsockname()[:2]
    return f"http://{join_host_port(host, port)}"
