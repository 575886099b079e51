"""Run a worker as a child process and watch its progress (demo, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from enricher.config import Settings


class ChildProcess:
    """An `enricher COMMAND` child process with these settings, its output to a log file."""

    command: list[str] = []

    def __init__(self, settings: Settings, log_path=None, extra_env: dict | None = None, cwd=None):
        self.settings = settings
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.cwd = cwd  # the benchmarks run an earlier release's worker from its checkout
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self):
        env = {**os.environ, **self.settings.to_env(), **self.extra_env}
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([sys.executable, "-m", "enricher.cli", *self.command], env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None
        return self.process.returncode


class TriggerProcess(ChildProcess):
    command = ["trigger"]


class WorkerProcess(ChildProcess):
    command = ["worker"]

    @property
    def url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"

    def _get(self, path: str, timeout: float):
        request = urllib.request.Request(self.url + path)
        if self.settings.api_token:
            request.add_header("Authorization", f"Bearer {self.settings.api_token}")
        return urllib.request.urlopen(request, timeout=timeout)

    def status(self) -> dict | None:
        try:
            with self._get("/status", timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return resp.read().decode()

    def wait_for(self, predicate, timeout: float, on_status=None, interval: float = 0.25) -> dict:
        """Poll /status until predicate(status) holds; raises on timeout or exit."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with code {self.process.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            status = self.status()
            if status is not None:
                if on_status:
                    on_status(status)
                if predicate(status):
                    return status
            time.sleep(interval)
        raise TimeoutError(f"worker did not get there in {timeout}s; last status {status}")
