"""Generate the protobuf/gRPC stubs of ``proto/*.proto`` into this package."""

from __future__ import annotations

import fcntl
import importlib.resources
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent.parent / "proto"
PROTOS = ("billing.proto", "patient_events.proto")


def _outputs(proto: str) -> list[Path]:
    stem = proto.removesuffix(".proto")
    return [PACKAGE_DIR / f"{stem}_pb2.py", PACKAGE_DIR / f"{stem}_pb2_grpc.py"]


def is_stale() -> bool:
    """Whether any stub is missing or older than its ``.proto`` source."""
    for proto in PROTOS:
        source = PROTO_DIR / proto
        for out in _outputs(proto):
            if not out.exists():
                return True
            if source.exists() and source.stat().st_mtime > out.stat().st_mtime:
                return True
    return False


def generate() -> None:
    """Run grpcio-tools' protoc over every ``.proto``; imports are rooted at ``pms.contracts``."""
    from grpc_tools import protoc

    if not PROTO_DIR.is_dir():
        raise RuntimeError(f"proto sources not found at {PROTO_DIR}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # Map the proto dir onto the package path so generated imports read
    # ``from pms.contracts import billing_pb2`` instead of a bare top-level name.
    args = [
        "protoc",
        f"-Ipms/contracts={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={PACKAGE_DIR.parent.parent}",
        f"--pyi_out={PACKAGE_DIR.parent.parent}",
        f"--grpc_python_out={PACKAGE_DIR.parent.parent}",
        *[f"pms/contracts/{p}" for p in PROTOS],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")


def ensure_generated() -> None:
    """Generate the stubs if needed, under a file lock so parallel importers don't race."""
    if not is_stale():
        return
    lock_path = PACKAGE_DIR / ".generate.lock"
    try:
        handle = open(lock_path, "w")  # noqa: SIM115 - held for the lock's lifetime
    except OSError:
        # Read-only install (e.g. a container): the build must have generated them.
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if is_stale():
            generate()


if __name__ == "__main__":
    generate()
    sys.stdout.write(f"generated stubs for {', '.join(PROTOS)} into {PACKAGE_DIR}\n")
