"""``dashboard.serve``: the command line and environment the registry's runner execs."""

from __future__ import annotations

from dashboard import serve
from pms import forwarding
from pms.registry import by_name
from pms.settings import Settings


def test_command_is_headless_on_the_configured_port(stub_settings: Settings) -> None:
    settings = Settings(_env_file=None, **{**stub_settings.model_dump(),  # type: ignore[call-arg]
                                           "dashboard": {"host": "127.0.0.1", "port": 18555}})
    argv = serve.command(settings)
    assert argv[1:4] == ["-m", "streamlit", "run"]
    assert argv[4].endswith("dashboard/streamlit_app.py")
    for flag in ("--server.headless=true", "--server.port=18555", "--server.address=127.0.0.1",
                 "--browser.gatherUsageStats=false", "--client.showErrorDetails=none",
                 "--server.fileWatcherType=none"):
        assert flag in argv
    assert argv[-2:] == ["--", f"--gateway-url={settings.gateway.base_url}"]


def test_environment_has_the_gateway_but_no_platform_secrets(stub_settings: Settings) -> None:
    settings = Settings(_env_file=None, **{**stub_settings.model_dump(),  # type: ignore[call-arg]
                                           "gateway": {"url": "http://gw.internal:4004", "port": 4004},
                                           "admin_password": "an-admin-password-here"})
    env = serve.environment(settings)
    assert env["PMS_GATEWAY__URL"] == "http://gw.internal:4004"
    assert env["PMS_DATA_DIR"] == str(settings.data_dir.resolve())
    for name in ("PMS_JWT__SECRET", "PMS_DATABASE_URL", "PMS_ANALYST_DATABASE_URL", "PMS_ADMIN_PASSWORD"):
        assert name not in env
    secret = settings.jwt.secret.get_secret_value()  # type: ignore[union-attr]
    assert all(secret not in value for value in env.values())
    # Only the derived key that vouches for browser addresses at the gateway (pms.forwarding).
    assert bytes.fromhex(env[forwarding.KEY_VARIABLE]) == forwarding.derive_key(secret)
    assert env["FORWARDED_ALLOW_IPS"] == settings.public_forwarded_allow_ips == ""  # trusts no X-Forwarded-For


def test_registry_entry_points_here() -> None:
    spec = by_name("dashboard")
    assert spec.target == "dashboard.serve:run"
    assert spec.probe_path == "/_stcore/health"
