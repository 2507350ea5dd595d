"""``host:port`` addresses and upstream URLs (``http://``, ``https://``, ``grpc://``,
``grpcs://``) as written in a config."""

import ipaddress
import re
from urllib.parse import urlsplit

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def _check_host(host: str, text: str) -> None:
    if not host:
        raise ValueError(f"{text!r} has no host (use 0.0.0.0 for every IPv4 interface)")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name")


def split_host_port(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``"127.0.0.1:80"`` -> ``("127.0.0.1", 80)``; IPv6 hosts are written ``[::1]:80``.

    Raises ValueError with a message fit for the user.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid address {text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
        if ":" in host:
            raise ValueError(f"invalid address {text!r}: write an IPv6 host in brackets: [::1]:80")
        _check_host(host, text)
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"invalid address {text!r}: the port must be a number")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"invalid address {text!r}: the port must be in {lowest}..65535")
    return host, port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def looks_like_url(text: str) -> bool:
    return "://" in text


def speaks_http2(url: str) -> bool:
    """Whether an upstream URL names an HTTP/2 (gRPC) upstream: ``grpc://`` or ``grpcs://``."""
    return urlsplit(url).scheme.lower() in ("grpc", "grpcs")


def parse_upstream_url(text: str) -> tuple[str, str, bool]:
    """``http://host:port/base/`` -> ``("host:port", "/base", False)``; the last item says
    whether the URL is ``https://`` (or ``grpcs://``). The port defaults to 80 (443 with TLS).

    Raises ValueError with a message fit for the user.
    """
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "grpc", "grpcs"):
        raise ValueError(
            f"{text!r}: an upstream URL must start with http://, https://, grpc:// or grpcs://"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r}: credentials in an upstream URL are not supported")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"{text!r}: an upstream URL cannot have a query or a fragment")
    netloc = parts.netloc
    if not netloc:
        raise ValueError(f"{text!r}: the URL has no host")
    has_port = netloc.rsplit("]", 1)[-1].count(":") == 1
    tls = scheme in ("https", "grpcs")
    address = netloc if has_port else f"{netloc}:{443 if tls else 80}"
    host, port = split_host_port(address)
    return join_host_port(host, port), parts.path.rstrip("/"), tls
