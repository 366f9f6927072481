"""A moto server (AWS APIs on a local port, in this process) for the infra tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from pms import process
from pms.settings import Settings

REGION = "eu-west-1"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/pms:1.4.2"
KAFKA = "b-1.pms-msk.example.internal:9092,b-2.pms-msk.example.internal:9092"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # Fargate tasks "run" at once in moto (it starts no containers), so steady state is reachable.
        mp.setenv("MOTO_ECS_SERVICE_RUNNING", "1")
        # The task execution role attaches AWS's managed AmazonECSTaskExecutionRolePolicy.
        mp.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        port = process.free_port()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per AWS call otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def infra_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for one stack on moto: fast polling, short deadlines."""

    def make(stack: str, **infra: object) -> Settings:
        values = {"stack_name": stack, "region": REGION, "image": IMAGE, "poll_interval_s": 0.01,
                  "wait_timeout_s": 20.0, **infra}
        return Settings(_env_file=None, data_dir=tmp_path / stack, kafka_bootstrap_servers=KAFKA,  # type: ignore[call-arg]
                        infra=values)

    return make


@pytest.fixture
def console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False)


def output(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]
