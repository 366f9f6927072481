"""Destroy waits out AWS's lingering dependencies and nothing else (faults injected by a fake action)."""

from __future__ import annotations

import pytest


def test_destroy_retries_only_while_aws_reports_a_dependency() -> None:
    """Deleting a subnet or group fails with DependencyViolation while ENIs linger: wait, don't give up."""
    from botocore.exceptions import ClientError

    from infra import aws

    def error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, "DeleteSubnet")

    destroyer = aws.Destroyer(None, None, report=aws.Report(),  # type: ignore[arg-type]
                              wait=aws.polling_waiter(timeout=2.0, interval=0.001))
    outcomes = [error("DependencyViolation"), error("DependencyViolation"), None]
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    destroyer._until_deleted("subnet", flaky)
    assert len(calls) == 3

    def denied() -> None:
        raise error("UnauthorizedOperation")

    with pytest.raises(ClientError, match="UnauthorizedOperation"):
        destroyer._until_deleted("subnet", denied)

    def stuck() -> None:
        raise error("DependencyViolation")

    short = aws.Destroyer(None, None, report=aws.Report(),  # type: ignore[arg-type]
                          wait=aws.polling_waiter(timeout=0.05, interval=0.001))
    with pytest.raises(TimeoutError):
        short._until_deleted("subnet", stuck)
