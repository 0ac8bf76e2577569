"""``gateway run --workers N``: N worker processes in one consumer group, supervised.

Each worker is a full ``gateway run`` process of its own (its own event loop, Kafka
clients and HTTP lanes), so N processes use N cores. Each serves its metrics on its own
port, ``metrics_port + i``: Prometheus scrapes every port and ``sum()`` adds them up, which
is simpler and cheaper than prometheus-client's multiprocess mode (no shared files, no
gauges that need a merge rule).

SIGTERM or SIGINT is passed on to every worker; the supervisor waits for them (each
drains and commits) and exits 0 when all did. A worker that dies on its own is started
again after a short pause, so one crash does not halve throughput until someone notices.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from ..config import Config
from ._broker import die_with_parent

__all__ = ["supervise", "worker_config"]

log = logging.getLogger("gateway.supervisor")


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index``'s configuration: its own metrics port and, with static membership,
    its own instance id, the same every time it is started again."""
    own = config.replace(metrics_port=config.metrics_port + index)
    if config.instance_id is not None:
        own = own.replace(instance_id=f"{config.instance_id}-{index}")
    return own


def supervise(config: Config, workers: int, tiers: Sequence[str], *, metrics: bool = True) -> int:
    """Run ``workers`` worker processes until a signal; returns the exit code."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def start(index: int) -> subprocess.Popen[bytes]:
        env = os.environ | worker_config(config, index).to_env()
        args = [sys.executable, "-m", "gateway", "run", "--tiers", ",".join(tiers)]
        if not metrics:
            args.append("--no-metrics")
        # die_with_parent: a supervisor killed with SIGKILL must not leave workers behind.
        process = subprocess.Popen(args, env=env, preexec_fn=die_with_parent())
        log.info("worker started", extra={"worker": index, "pid": process.pid,
                                           "metrics_port": config.metrics_port + index if metrics else None})
        return process

    processes: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processes.extend(start(i) for i in range(workers))
    while not stopping:
        time.sleep(0.5)
        for index, process in enumerate(processes):
            code = process.poll()
            if code is not None and not stopping:
                log.error("worker exited, starting it again", extra={"worker": index, "exit_code": code})
                time.sleep(1)
                if not stopping:
                    processes[index] = start(index)
    codes = [process.wait() for process in processes]
    failed = [c for c in codes if c != 0]
    if failed:
        log.error("workers stopped with errors", extra={"exit_codes": codes})
        return 1
    log.info("all workers stopped", extra={"workers": workers})
    return 0
