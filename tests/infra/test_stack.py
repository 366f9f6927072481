"""The desired stack as data: built from the registry, refuses what cannot be deployed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from infra.stack import PUBLIC_ROUTES, SERVICE_SECRETS, StackError, desired_stack, service_port
from pms.registry import SERVICES, by_name, start_order
from pms.settings import Settings


def test_one_task_per_registry_service_in_dependency_order(infra_settings: Callable[..., Settings]) -> None:
    stack = desired_stack(infra_settings("s"))
    assert [t.name for t in stack.services] == [s.name for s in start_order()]
    for task in stack.services:
        spec = by_name(task.name)
        assert task.command == ("serve", spec.name)
        assert task.port == service_port(spec)
        assert task.public == spec.public
        assert task.environment[f"PMS_{spec.section.upper()}__HOST"] == "0.0.0.0"
        assert task.secrets == SERVICE_SECRETS
        assert task.log_group == f"/s/{spec.name}"
    assert stack.db_init.one_off and stack.db_init.entry_point == ("python", "-m", "infra.dbinit")
    assert "PMS_DBINIT_SUPERUSER_URL" in stack.db_init.secrets
    assert "PMS_DBINIT_SUPERUSER_URL" not in stack.services[0].secrets


def test_services_find_each_other_through_cloud_map_names(infra_settings: Callable[..., Settings]) -> None:
    env = desired_stack(infra_settings("s")).services[0].environment
    assert env["PMS_PATIENT__URL"] == "http://patient.s.internal:4000"
    assert env["PMS_BILLING__TARGET"] == "billing.s.internal:9001"
    assert env["PMS_GATEWAY__URL"] == "http://gateway.s.internal:4004"
    assert env["PMS_KAFKA_BOOTSTRAP_SERVERS"].startswith("b-1.pms-msk")
    assert not any(word in key for key in env for word in ("SECRET", "PASSWORD", "DATABASE_URL"))


def test_public_services_get_target_groups_and_routes(infra_settings: Callable[..., Settings]) -> None:
    stack = desired_stack(infra_settings("s"))
    public = {s.name for s in SERVICES if s.public}
    assert {tg.service for tg in stack.target_groups} == public == set(PUBLIC_ROUTES)
    gateway = stack.target_group_for("gateway")
    assert gateway is not None and gateway.port == 4004 and "/api/*" in (gateway.paths or ())
    dashboard = stack.target_group_for("dashboard")
    assert dashboard is not None and dashboard.paths is None and dashboard.health_path == "/_stcore/health"


def test_security_groups_expose_only_the_load_balancer(infra_settings: Callable[..., Settings]) -> None:
    groups = {g.name: g for g in desired_stack(infra_settings("s")).security_groups}
    world = [(g, r) for g in groups.values() for r in g.ingress if r.cidr == "0.0.0.0/0"]
    assert [(g.name, r.port_from) for g, r in world] == [("s-alb", 80)]
    assert {r.source_group for r in groups["s-db"].ingress} == {"s-services"}
    assert {(r.port_from, r.source_group) for r in groups["s-services"].ingress if r.source_group == "s-alb"} == {
        (4004, "s-alb"), (8501, "s-alb")}


def test_billing_metrics_port_is_mapped_and_reachable_from_the_stack(infra_settings: Callable[..., Settings]) -> None:
    stack = desired_stack(infra_settings("s"))
    tasks = {t.name: t for t in stack.services}
    assert tasks["billing"].metrics_port == Settings().billing.metrics_port == 9101
    assert all(t.metrics_port is None for name, t in tasks.items() if name != "billing")
    internal = next(r for g in stack.security_groups if g.name == "s-services" for r in g.ingress
                    if r.source_group == "s-services")
    assert internal.port_from <= 9101 <= internal.port_to
    assert all(internal.port_from <= t.port <= internal.port_to for t in stack.services if t.port)


def test_public_services_trust_only_the_load_balancer_subnets_forwarded_for(
        infra_settings: Callable[..., Settings]) -> None:
    """A client's own X-Forwarded-For must never become the address the gateway and auth limit by."""
    import ipaddress

    stack = desired_stack(infra_settings("s"))
    env = stack.services[0].environment
    trusted = [ipaddress.ip_network(cidr) for cidr in env["PMS_PUBLIC_FORWARDED_ALLOW_IPS"].split(",")]
    assert sorted(map(str, trusted)) == sorted(s.cidr for s in stack.subnets if s.public)
    assert "*" not in env["PMS_PUBLIC_FORWARDED_ALLOW_IPS"]
    assert env["PMS_FORWARDED_ALLOW_IPS"] == "*"  # internal services: reached by the stack's own tasks only


def test_refuses_without_kafka_bootstrap(infra_settings: Callable[..., Settings]) -> None:
    settings = infra_settings("s").model_copy(update={"kafka_bootstrap_servers": None})
    with pytest.raises(StackError, match="PMS_KAFKA_BOOTSTRAP_SERVERS"):
        desired_stack(settings)


@pytest.mark.parametrize("name", ["1abc", "has_underscore", "x" * 21, ""])
def test_refuses_bad_stack_names(infra_settings: Callable[..., Settings], name: str) -> None:
    with pytest.raises(StackError, match="STACK_NAME"):
        desired_stack(infra_settings(name or "ok").model_copy(
            update={"infra": infra_settings("ok").infra.model_copy(update={"stack_name": name})}))


def test_refuses_a_vpc_too_small_for_four_subnets(infra_settings: Callable[..., Settings]) -> None:
    with pytest.raises(StackError, match="too small"):
        desired_stack(infra_settings("s", vpc_cidr="10.0.0.0/24"))
    subnets = desired_stack(infra_settings("s", vpc_cidr="10.9.0.0/22")).subnets
    assert [s.cidr for s in subnets] == ["10.9.0.0/24", "10.9.1.0/24", "10.9.2.0/24", "10.9.3.0/24"]


def test_certificate_turns_on_https_and_a_redirect(infra_settings: Callable[..., Settings]) -> None:
    plain = desired_stack(infra_settings("s"))
    assert [(li.port, li.protocol) for li in plain.listeners] == [(80, "HTTP")]
    tls = desired_stack(infra_settings("s", certificate_arn="arn:aws:acm:eu-west-1:1:certificate/x"))
    assert [(li.port, li.protocol, li.redirect_to_https) for li in tls.listeners] == [
        (443, "HTTPS", False), (80, "HTTP", True)]
    assert tls.forwarding_listener.certificate_arn == "arn:aws:acm:eu-west-1:1:certificate/x"
    alb = next(g for g in tls.security_groups if g.name == "s-alb")
    assert [(r.port_from, r.cidr) for r in alb.ingress] == [(80, "0.0.0.0/0"), (443, "0.0.0.0/0")]

