import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def quorum_bin() -> str:
    """The quorum binary: $QUORUM, else the workspace's debug build (`cargo build -p quorum-cli`)."""
    path = os.environ.get("QUORUM") or str(ROOT / "target" / "debug" / "quorum")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no quorum binary at {path}: run `cargo build -p quorum-cli` or set QUORUM")
    return path


class Server:
    """`quorum ps` on a free loopback port, stopped at the end of the test."""

    def __init__(self, quorum_bin: str, run: Path, *args: str):
        self.run = run
        self.log = open(run.parent / f"{run.name}.log", "w+")
        self.proc = subprocess.Popen(
            [quorum_bin, "ps", "--listen", "127.0.0.1:0", "--out", str(run), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while True:
            self.log.seek(0)
            m = re.search(r"listening on (\S+)", self.log.read())
            if m:
                self.addr = m.group(1)
                break
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"quorum ps did not start: {self.log.read()}")
            time.sleep(0.05)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def server(quorum_bin, tmp_path):
    started = []

    def start(*args: str, name: str = "ps") -> Server:
        s = Server(quorum_bin, tmp_path / name, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
