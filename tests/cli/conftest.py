"""Helpers for tests that drive the ``idgate`` command line as a user would: a subprocess
with a clean environment (no IDGATE_* of the caller's), a given working directory, and
``idgate serve`` processes whose printed banner and logs the test reads."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import IDGATE, ROOT, free_port, wait_ready
from tests.waiting import WaitTimeout

EXAMPLE_CONFIG = ROOT / "idgate.example.toml"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without idgate settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("IDGATE_") and k not in ("REDIS_URL", "DATABASE_URL")
    }
    env.update(extra)
    return env


def idgate(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IDGATE), *args],
        env=env if env is not None else clean_env(IDGATE_ENV="dev"),
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )


@dataclass
class Served:
    """An ``idgate serve`` process with stdout and stderr in files of its own."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    out_path: Path
    err_path: Path
    stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> Served:
        try:
            wait_ready(
                self.proc,
                self.url,
                timeout,
                lambda: f"idgate serve exited {self.proc.returncode}:\n{self.stderr()}",
            )
        except WaitTimeout as exc:
            raise AssertionError(f"idgate serve did not become ready:\n{self.stderr()}") from exc
        return self

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ServeFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Served] = []

    def __call__(
        self,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        config: Path = EXAMPLE_CONFIG,
        port: int | None = None,
        cwd: Path | None = None,
    ) -> Served:
        port = port or free_port()
        n = len(self.started)
        out_path, err_path = self.tmp / f"serve-{n}.out", self.tmp / f"serve-{n}.err"
        argv = [
            str(IDGATE),
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=err, env=env or clean_env(IDGATE_ENV="dev"), cwd=cwd or ROOT
            )
        served = Served(proc, port, data_dir, out_path, err_path)
        self.started.append(served)
        return served


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """Start ``idgate serve`` processes; every one still running is stopped afterwards."""
    factory = ServeFactory(tmp_path)
    yield factory
    for served in factory.started:
        served.stop()
