"""JWT helpers and password hashing: what verifiers accept and everything they must refuse."""

from __future__ import annotations

import time
import warnings
from datetime import UTC, datetime, timedelta, tzinfo

import jwt
import jwt.warnings
import pytest
from pydantic import SecretStr

from pms.errors import Unauthorized
from pms.security import Role, decode_token, encode_token, hash_password, needs_rehash, verify_password
from pms.settings import Settings

SECRET = "unit-test-secret-that-is-long-enough-0123456789"


def _settings(**jwt_overrides: object) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=SecretStr("postgresql://pms:pw@db.example/postgres"),
        jwt={"secret": SecretStr(SECRET), **jwt_overrides},
    )


SETTINGS = _settings()


def _claims(**overrides: object) -> dict[str, object]:
    now = datetime.now(UTC)
    claims: dict[str, object] = {"sub": "staff@clinic.example", "role": "STAFF", "iat": now, "nbf": now,
                                 "exp": now + timedelta(hours=12), "iss": "pms-auth", "aud": "pms", "jti": "j1"}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_round_trip() -> None:
    token = encode_token(SETTINGS, sub="admin@pms.local", role=Role.ADMIN)
    principal = decode_token(SETTINGS, token)
    assert (principal.sub, principal.role) == ("admin@pms.local", Role.ADMIN)
    assert principal.jti and principal.exp - time.time() == pytest.approx(3600, abs=5)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"


def test_every_token_is_unique() -> None:
    first = encode_token(SETTINGS, sub="a@b.example", role="STAFF")
    second = encode_token(SETTINGS, sub="a@b.example", role="STAFF")
    assert decode_token(SETTINGS, first).jti != decode_token(SETTINGS, second).jti


def test_expired_token_is_refused() -> None:
    token = encode_token(SETTINGS, sub="a@b.example", role=Role.STAFF, ttl_s=-30)
    with pytest.raises(Unauthorized, match="Token expired") as caught:
        decode_token(SETTINGS, token)
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"] == "Bearer"


def _hs512(claims: dict[str, object]) -> str:
    with warnings.catch_warnings():  # signed with the HS256-sized key on purpose
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, SECRET, algorithm="HS512")


@pytest.mark.parametrize(
    ("why", "token"),
    [
        ("wrong key", jwt.encode(_claims(), "another-secret-that-is-also-long-enough-000", algorithm="HS256")),
        ("wrong issuer", jwt.encode(_claims(iss="someone-else"), SECRET, algorithm="HS256")),
        ("wrong audience", jwt.encode(_claims(aud="other-app"), SECRET, algorithm="HS256")),
        ("alg none", jwt.encode(_claims(), None, algorithm="none")),
        ("other HMAC alg", _hs512(_claims())),
        ("missing jti", jwt.encode(_claims(jti=None), SECRET, algorithm="HS256")),
        ("missing role", jwt.encode(_claims(role=None), SECRET, algorithm="HS256")),
        ("unknown role", jwt.encode(_claims(role="ROOT"), SECRET, algorithm="HS256")),
        ("not yet valid", jwt.encode(_claims(nbf=datetime.now(UTC) + timedelta(hours=6)), SECRET,
                                     algorithm="HS256")),
        ("garbage", "not.a.token"),
        ("empty", ""),
    ],
)
def test_bad_tokens_are_refused(why: str, token: str) -> None:
    with pytest.raises(Unauthorized, match="Invalid token"):
        decode_token(SETTINGS, token)


def test_tampered_payload_is_refused() -> None:
    token = encode_token(SETTINGS, sub="analyst@clinic.example", role=Role.ANALYST)
    header, _payload, signature = token.split(".")
    forged = jwt.encode(_claims(role="ADMIN"), "x" * 40, algorithm="HS256").split(".")[1]
    with pytest.raises(Unauthorized):
        decode_token(SETTINGS, f"{header}.{forged}.{signature}")


def test_a_token_for_a_different_audience_setting_is_refused() -> None:
    token = encode_token(_settings(audience="other"), sub="a@b.example", role=Role.STAFF)
    with pytest.raises(Unauthorized):
        decode_token(SETTINGS, token)


def test_passwords_hash_and_verify() -> None:
    hashed = hash_password("correct horse battery staple")
    assert hashed.startswith("$argon2id$")
    assert "correct horse" not in hashed
    assert verify_password(hashed, "correct horse battery staple")
    assert not verify_password(hashed, "wrong")
    assert not verify_password(None, "correct horse battery staple")  # unknown user, same cost
    assert not verify_password("not-a-hash", "x")
    assert not needs_rehash(hashed)


def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified tokens are remembered (a fifth of the gateway's CPU), but never past their expiry."""
    from pms import security

    token = encode_token(SETTINGS, sub="a@b.example", role=Role.STAFF, ttl_s=60)
    principal = decode_token(SETTINGS, token)
    assert decode_token(SETTINGS, token) == principal  # the remembered answer
    monkeypatch.setattr(security, "_now", lambda: principal.exp + security.LEEWAY_S - 0.5)
    assert decode_token(SETTINGS, token) == principal  # inside the leeway, as PyJWT allows
    monkeypatch.setattr(security, "_now", lambda: principal.exp + security.LEEWAY_S)
    with pytest.raises(Unauthorized, match="Token expired"):
        decode_token(SETTINGS, token)


def test_a_remembered_token_is_refused_while_the_clock_is_before_its_issue_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock set back must not let the memory accept what PyJWT would call not yet valid."""
    from pms import security

    token = encode_token(SETTINGS, sub="a@b.example", role=Role.STAFF, ttl_s=3600)
    principal = decode_token(SETTINGS, token)  # remembered now
    assert principal.not_before == pytest.approx(principal.iat, abs=1)  # nbf is whole seconds, iat is not
    monkeypatch.setattr(security, "_now", lambda: principal.not_before - security.LEEWAY_S)
    assert decode_token(SETTINGS, token) == principal  # inside the leeway, as PyJWT allows
    monkeypatch.setattr(security, "_now", lambda: principal.not_before - security.LEEWAY_S - 1)
    with pytest.raises(Unauthorized, match="Invalid token"):
        decode_token(SETTINGS, token)
    security._verified.cache_clear()  # PyJWT itself, with its clock at those times: the same answers
    _set_clocks(monkeypatch, principal.not_before - security.LEEWAY_S - 1)
    with pytest.raises(Unauthorized, match="Invalid token"):
        decode_token(SETTINGS, token)
    _set_clocks(monkeypatch, principal.not_before - security.LEEWAY_S)
    assert decode_token(SETTINGS, token) == principal
    # Whole seconds, as PyJWT counts them: an issue time of x.9 is "not before x", for both.
    for fraction in (0.1, 0.9):
        issued = float(int(time.time()) + 100) + fraction
        fractional = jwt.encode(_claims(iat=issued, nbf=int(issued), exp=int(issued) + 3600,
                                        jti=f"fraction-{fraction}"), SECRET,
                                algorithm="HS256")
        _set_clocks(monkeypatch, int(issued) - security.LEEWAY_S)
        security._verified.cache_clear()
        first = decode_token(SETTINGS, fractional)  # PyJWT accepts it at this clock ...
        assert decode_token(SETTINGS, fractional) == first  # ... and so does the memory


def _set_clocks(monkeypatch: pytest.MonkeyPatch, at: float) -> None:
    """Both clocks a verification reads, PyJWT's and the token memory's, at ``at``."""
    from pms import security

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return datetime.fromtimestamp(at, tz)

    monkeypatch.setattr(jwt.api_jwt, "datetime", Frozen)
    monkeypatch.setattr(security, "_now", lambda: at)


def test_a_remembered_token_is_checked_against_the_verifiers_own_settings() -> None:
    """The memory is per key, audience and issuer: a token accepted under one is refused under another."""
    token = encode_token(SETTINGS, sub="a@b.example", role=Role.STAFF)
    assert decode_token(SETTINGS, token).sub == "a@b.example"
    for other in (_settings(secret=SecretStr("another-secret-that-is-also-long-enough-000")),
                  _settings(audience="other"), _settings(issuer="someone-else")):
        with pytest.raises(Unauthorized, match="Invalid token"):
            decode_token(other, token)
    with pytest.raises(Unauthorized, match="Invalid token"):
        decode_token(SETTINGS, token, audience="pms:internal")


def test_a_refused_token_is_verified_again_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure is not remembered: a token that is not valid yet becomes valid when its time comes."""
    from pms import security

    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(security.jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    token = jwt.encode(_claims(nbf=datetime.now(UTC) + timedelta(hours=6), jti="not-yet"), SECRET, algorithm="HS256")
    for _ in range(2):
        with pytest.raises(Unauthorized, match="Invalid token"):
            decode_token(SETTINGS, token)
    assert len(calls) == 2
