"""The dashboard's signed client address: only the holder of the derived key can vouch, briefly, for an IP."""

from __future__ import annotations

import pytest

from pms import forwarding

KEY = forwarding.derive_key("k" * 40)


def test_a_fresh_signature_vouches_for_its_address() -> None:
    headers = forwarding.sign(KEY, "203.0.113.7", now=1_000_000)
    assert forwarding.verified_address(KEY, headers[forwarding.ADDRESS_HEADER],
                                       headers[forwarding.SIGNATURE_HEADER], now=1_000_030) == "203.0.113.7"
    v6 = forwarding.sign(KEY, "2001:db8::1", now=5)
    assert forwarding.verified_address(KEY, "2001:db8::1", v6[forwarding.SIGNATURE_HEADER], now=5) == "2001:db8::1"


@pytest.mark.parametrize(("address", "signature", "now"), [
    ("203.0.113.8", None, 1_000_000),  # another address than the one signed
    ("203.0.113.7", None, 1_000_000 + forwarding.MAX_AGE_S + 1),  # too old
    ("203.0.113.7", None, 1_000_000 - forwarding.MAX_AGE_S - 1),  # from the future
    ("203.0.113.7", "1000000.00", 1_000_000),  # a made-up MAC
    ("203.0.113.7", "abc.def", 1_000_000),
    ("203.0.113.7", "", 1_000_000),
    ("203.0.113.7", "²." + "0" * 64, 1_000_000),  # a digit to str.isdigit, not to int()
    ("203.0.113.7", "1000000.é", 1_000_000),  # hmac.compare_digest raises on non-ASCII str (was a 500)
])
def test_anything_else_vouches_for_nothing(address: str, signature: str | None, now: int) -> None:
    signed = forwarding.sign(KEY, "203.0.113.7", now=1_000_000)[forwarding.SIGNATURE_HEADER]
    assert forwarding.verified_address(KEY, address, signature if signature is not None else signed, now=now) is None


def test_another_key_or_a_name_instead_of_an_ip_vouches_for_nothing() -> None:
    other = forwarding.derive_key("j" * 40)
    signed = forwarding.sign(other, "203.0.113.7", now=10)[forwarding.SIGNATURE_HEADER]
    assert forwarding.verified_address(KEY, "203.0.113.7", signed, now=10) is None
    name = forwarding.sign(KEY, "evil.example", now=10)[forwarding.SIGNATURE_HEADER]
    assert forwarding.verified_address(KEY, "evil.example", name, now=10) is None


def test_the_derived_key_depends_on_the_jwt_key_only() -> None:
    assert forwarding.derive_key("k" * 40) == KEY and len(KEY) == 32
    assert forwarding.derive_key("k" * 39 + "j") != KEY
