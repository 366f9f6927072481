"""The one list of services: names, sections, dependency order."""

from __future__ import annotations

from pathlib import Path

import pytest

from pms.registry import SERVICES, Kind, Probe, ServiceSpec, by_name, start_order
from pms.settings import Settings


def _spec(name: str, *depends_on: str) -> ServiceSpec:
    return ServiceSpec(name, "", Kind.CALLABLE, "x:run", "auth", depends_on=depends_on)


def test_names_are_unique_and_dependencies_known() -> None:
    names = [spec.name for spec in SERVICES]
    assert len(names) == len(set(names))
    for spec in SERVICES:
        assert set(spec.depends_on) <= set(names), spec.name
        assert ":" in spec.target


def test_start_order_puts_dependencies_first() -> None:
    order = [spec.name for spec in start_order()]
    assert sorted(order) == sorted(spec.name for spec in SERVICES)
    for spec in SERVICES:
        for dep in spec.depends_on:
            assert order.index(dep) < order.index(spec.name), f"{dep} must start before {spec.name}"
    assert order[-1] == "dashboard"


def test_start_order_is_stable_and_ignores_unknown_dependencies() -> None:
    specs = (_spec("c", "a"), _spec("a"), _spec("b", "outside"))
    assert [s.name for s in start_order(specs)] == ["a", "b", "c"]


@pytest.mark.parametrize("specs", [
    (_spec("a", "b"), _spec("b", "a")),
    (_spec("a", "a"),),
    (_spec("ok"), _spec("x", "z"), _spec("y", "x"), _spec("z", "y")),
])
def test_cycles_are_detected(specs: tuple[ServiceSpec, ...]) -> None:
    with pytest.raises(ValueError, match="dependency cycle"):
        start_order(specs)


def test_every_section_has_host_and_port_settings(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    ports = set()
    for spec in SERVICES:
        ports.add(spec.port(settings))
        assert spec.host(settings) == "127.0.0.1"
        assert spec.port_setting == f"PMS_{spec.section.upper()}__PORT"
        assert spec.port_setting.removeprefix("PMS_").split("__")[0].lower() in Settings.model_fields
    assert len(ports) == len(SERVICES), "two services share a default port"
    assert by_name("billing").probe is Probe.GRPC
    assert by_name("gateway").public and by_name("dashboard").public


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known services: billing"):
        by_name("nope")
