"""What every role's command line shares: addresses, exit codes, error reporting, logging.

Exit codes (every ``tokenscaler`` command):

| code | meaning |
| --- | --- |
| 0 | ok |
| 1 | bad input: a config, profile, state or other file that cannot be used, an address in use, a missing extra |
| 2 | usage: flags that cannot work together or out of range (argparse's own errors too) |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable

from tokenscaler.core.validation import ConfigError

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def address(default_host: str) -> Callable[[str], tuple[str, int]]:
    """An argparse ``type`` for ``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host is
    ``default_host``; port 0 picks a free port)."""

    def parse(value: str) -> tuple[str, int]:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
        return host.strip("[]") or default_host, int(port)

    return parse


def shown(host: str, port: int) -> str:
    """``HOST:PORT`` as a URL authority (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="(default: INFO)")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(role: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``tokenscaler ROLE: MESSAGE`` to stderr and return ``code``."""
    print(f"tokenscaler {role}: {message}", file=sys.stderr)
    return code


def usage_errors(role: str, errors: list[str]) -> int:
    """Report flag problems (one line each) and return the usage exit code; 0 if none."""
    for e in errors:
        print(f"tokenscaler {role}: {e}", file=sys.stderr)
    return EXIT_USAGE if errors else EXIT_OK


def config_error(e: ConfigError) -> int:
    """Report a :class:`ConfigError` (one line per problem, each naming the file) and return 1."""
    for line in e.lines():
        print(line, file=sys.stderr)
    return EXIT_BAD_INPUT


def bind(flag: str, host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port``; an :class:`OSError` that names
    the flag and the address (``--listen 127.0.0.1:8001 is in use``) when it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, bind_message(flag, host, port, e)) from e
    return sock


def bind_message(flag: str, host: str, port: int, e: OSError) -> str:
    import errno

    if e.errno == errno.EADDRINUSE:
        return f"{flag} {shown(host, port)} is in use"
    return f"{flag} {shown(host, port)}: cannot listen: {e.strerror or e}"
