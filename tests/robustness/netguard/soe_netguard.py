"""Refuse (and record) every connection or name lookup that would leave this machine.

Loopback and Unix sockets stay allowed: torchrun's rendezvous and gloo use them. Each
refused attempt raises ConnectionRefusedError *and* is recorded (in `attempts`, and in the
file named by $SOE_NETGUARD_LOG when set), so a caller that swallows the error still fails
the test that checks the record.
"""
from __future__ import annotations

import ipaddress
import os
import socket

attempts: list[str] = []
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}
_originals: dict[str, object] = {}


def is_local(host: object) -> bool:
    """Whether `host` (an address or a name) is this machine, decided without any lookup."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.split("%", 1)[0].strip("[]").lower()
    if name in _LOCAL_NAMES or name == socket.gethostname().lower():
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse(what: str) -> None:
    attempts.append(what)
    log = os.environ.get("SOE_NETGUARD_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"pid {os.getpid()}: {what}\n")
    raise ConnectionRefusedError(f"network access blocked by the test guard: {what}")


def _checked(family: int, address: object, what: str) -> None:
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not is_local(address[0]):
        _refuse(f"{what} {address[0]}:{address[1] if len(address) > 1 else '?'}")


def install() -> None:
    """Patch socket.connect, connect_ex, sendto and getaddrinfo (idempotent)."""
    if _originals:
        return
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sendto, real_getaddrinfo = socket.socket.sendto, socket.getaddrinfo
    _originals.update(connect=real_connect, connect_ex=real_connect_ex, sendto=real_sendto,
                      getaddrinfo=real_getaddrinfo)

    def connect(self: socket.socket, address: object) -> None:
        _checked(self.family, address, "connect")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        _checked(self.family, address, "connect")
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: bytes, *args: object) -> int:
        _checked(self.family, args[-1], "sendto")
        return real_sendto(self, data, *args)

    def getaddrinfo(host: object, *args: object, **kwargs: object):
        if host is not None and not is_local(host):
            _refuse(f"name lookup {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo


def uninstall() -> None:
    """Restore the real socket functions."""
    if not _originals:
        return
    socket.socket.connect = _originals["connect"]  # type: ignore[method-assign]
    socket.socket.connect_ex = _originals["connect_ex"]  # type: ignore[method-assign]
    socket.socket.sendto = _originals["sendto"]  # type: ignore[method-assign]
    socket.getaddrinfo = _originals["getaddrinfo"]  # type: ignore[assignment]
    _originals.clear()
