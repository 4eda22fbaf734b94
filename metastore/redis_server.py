"""A private redis-server on a free loopback port, for a launcher given no Redis URL (and for tests)."""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import subprocess
import tempfile
import time

from engine.parallel import free_port

log = logging.getLogger(__name__)


def _child_setup() -> None:
    """In the forked child, before exec: ignore Ctrl-C (the terminal sends SIGINT to the whole process group,
    and the workers must deregister before Redis goes; we stop it last), and die with the parent, so a killed
    launcher leaves no orphan behind (Linux PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class RedisServer:
    """Start with `start()` (or a `with` block); `url` is then redis://127.0.0.1:PORT/0. `stop()` ends it."""

    def __init__(self, executable: str = "redis-server") -> None:
        self.proc: subprocess.Popen[bytes] | None = None  # first: __del__ runs even when __init__ raises
        path = shutil.which(executable)
        if path is None:
            raise RuntimeError(f"{executable} not found on PATH: install redis-server (apt-get install "
                               "redis-server) or give a Redis URL in the configuration")
        self.executable = path
        self.port = 0
        self.dir: str | None = None
        self.restarts = 0  # times `restart_if_dead` brought it back

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        return self._launch(free_port(), timeout, threads_running=False)

    def restart_if_dead(self, timeout: float = 10.0) -> bool:
        """If the process died, start a new one on the same port (clients keep their URL and reconnect) and
        return True. Its contents are gone: the instances re-register and republish when their heartbeat finds
        them missing. Safe to call while other threads run (no Python code runs between fork and exec)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        code, port = self.proc.returncode, self.port
        self.stop()
        self.restarts += 1
        log.warning("private redis-server on port %d exited (code %s): restarting it (restart %d)", port, code,
                    self.restarts)
        self._launch(port, timeout, threads_running=True)
        return True

    def _launch(self, port: int, timeout: float, threads_running: bool) -> RedisServer:
        import redis

        self.port = port
        self.dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        # No persistence: the store is rebuilt from the live instances' heartbeats and KV events.
        cmd = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", self.dir, "--protected-mode", "yes", "--loglevel", "warning"]
        if not threads_running:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         preexec_fn=_child_setup)
        else:
            # NOTE: a preexec_fn (Python code in the forked child) can deadlock when the parent runs threads (gRPC,
            # Ray): setpriv sets the parent-death signal instead, and a new session keeps Ctrl-C away from it.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                log.warning("setpriv not found: the restarted redis-server will outlive a killed pdserve")
            prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
            self.proc = subprocess.Popen(prefix + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {err.strip()}") from None
                time.sleep(0.02)
        client.close()
        log.info("started private redis-server at %s (pid %d)", self.url, self.proc.pid)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
