"""Start a reward server from Python: ``trl-flow-egrpo serve-reward`` in a subprocess, e.g. a reward model on a
second GPU of the training machine, started and stopped by the training script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from .protocol import TOKEN_ENV


class RewardServerProcess:
    """``trl-flow-egrpo serve-reward NAME ARGS...`` running in a subprocess; a context manager that stops it.

    The subprocess starts at construction; :meth:`ready` waits until it listens and returns ``self`` with
    :attr:`url` set, so several servers can start at the same time. Its output goes to ``server.out`` and
    ``server.err`` in ``log_dir``.

    Args:
        name: the reward: a built-in name or ``module:callable`` (see ``serve-reward --help``).
        *args: more command-line options, e.g. ``"--device", "cuda:1", "--reward-kwargs", '{"dtype": "float16"}'``.
        port: the port; 0 (default) picks a free one.
        token: the bearer token the server requires (at least 16 visible ASCII characters, no whitespace),
            passed in its environment (never on the command line, where other users of the machine could read
            it); None requires none.
        log_dir: where the server's output goes (default: a new temporary directory).
        env: extra environment variables for the server (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``).
        startup_timeout: seconds :meth:`ready` waits for the server to listen.
    """

    def __init__(
        self,
        name: str,
        *args: str,
        port: int = 0,
        token: str | None = None,
        log_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
    ):
        child_env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
        child_env.update(env or {})
        if token is not None:
            child_env[TOKEN_ENV] = token
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="reward-server-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = self.log_dir / "server.out", self.log_dir / "server.err"
        self.startup_timeout = startup_timeout
        command = [sys.executable, "-m", "trl_flow_egrpo.cli", "serve-reward", name, "--port", str(port), *args]
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                command, stdout=stdout, stderr=stderr, env=child_env, stdin=subprocess.DEVNULL
            )
        self.url: str | None = None
        self.port: int | None = None

    def ready(self) -> RewardServerProcess:
        """Wait until the server listens; returns ``self``.

        Raises:
            RuntimeError: the server exited (its output is in the message).
            TimeoutError: it did not listen within ``startup_timeout`` seconds (it is stopped).
        """
        deadline = time.monotonic() + self.startup_timeout
        while self.url is None:
            for line in self.stdout_path.read_text().splitlines():
                if line.startswith("Serving reward"):
                    self.url = line.split(" on ", 1)[1].split()[0]
                    self.port = urllib.parse.urlsplit(self.url).port
            if self.url is not None:
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"The reward server exited with code {self.process.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"The reward server did not listen within {self.startup_timeout} s:\n{self.logs()}")
            time.sleep(0.1)
        return self

    def logs(self) -> str:
        """What the server printed so far (stdout, then stderr)."""
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would."""
        self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds); does nothing if it has exited."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RewardServerProcess:
        return self.ready()

    def __exit__(self, *exc_info) -> None:
        self.stop()
