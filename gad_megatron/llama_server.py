"""A local OpenAI-compatible endpoint: llama-cpp-python's server on 127.0.0.1, for tests and the quickstart.

    with LlamaServer() as server:          # SmolLM2-135M-Instruct GGUF by default
        cfg = TeacherConfig(base_url=server.base_url, model=server.model, api_key_env=None)

The server process is always stopped on exit (exceptions and Ctrl-C included) and, on Linux,
also when the parent process dies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from gad_megatron.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2-135m-instruct"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, not Linux/glibc
        pass


class LlamaServerError(RuntimeError):
    """The server did not come up; the message ends with the tail of its log."""


class LlamaServer:
    """Context manager around ``python -m llama_cpp.server`` bound to 127.0.0.1 on a free port."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        model: str = DEFAULT_ALIAS,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        startup_timeout_s: float = 120.0,
        extra_args: list[str] | None = None,
    ):
        if model_path is None:
            from gad_megatron.models.sources import alias_gguf_path

            model_path = alias_gguf_path(DEFAULT_ALIAS)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ConfigError(f"GGUF model not found: {self.model_path}")
        self.model = model
        self.n_ctx = n_ctx
        # One core is left to the caller (client, trainer): llama.cpp's threads stall badly when a core is busy.
        self.n_threads = n_threads or max(1, min((os.cpu_count() or 2) - 1, 8))
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args or [])
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._log_path: Path | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}/v1"

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.model,
            "--host", self.host,
            "--port", str(port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--verbose", "False",
            *self.extra_args,
        ]

    def log_tail(self, lines: int = 30) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                data = json.loads(resp.read())
            return resp.status == 200 and isinstance(data.get("data"), list)
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def start(self) -> "LlamaServer":
        if self._proc is not None:
            return self
        fd, log_path = tempfile.mkstemp(prefix="gad-llama-server-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log_path)
        for attempt in range(3):  # another process can grab the free port between bind and listen
            self.port = free_port(self.host)
            self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._proc = subprocess.Popen(
                self._command(self.port),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            try:
                self._wait_ready()
                log.info("llama.cpp server for %s ready at %s", self.model_path.name, self.base_url)
                return self
            except LlamaServerError:
                in_use = "address already in use" in self.log_tail().lower()
                self.stop(keep_log=True)
                if not in_use or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise LlamaServerError(
                    f"llama.cpp server exited with code {code} before answering; log {self._log_path}:\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(0.25)
        raise LlamaServerError(
            f"llama.cpp server did not answer {self.base_url}/models within {self.startup_timeout_s:.0f}s; "
            f"log {self._log_path}:\n{self.log_tail()}"
        )

    def stop(self, keep_log: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if not keep_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> "LlamaServer":
        try:
            return self.start()
        except BaseException:
            self.stop(keep_log=True)
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; normal paths call stop()
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
        except Exception:  # noqa: BLE001
            pass
