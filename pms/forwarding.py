"""The dashboard's signed statement of whose browser a request comes from.

The gateway counts anonymous calls (logins) per client address, and auth counts failed logins per
address too. Every login made through the dashboard reaches the gateway from the dashboard's own
address, so without this one person typing wrong passwords into the sign-in page would use up the
address's budget and lock every member of staff out of the dashboard for the window. The gateway
believes no ``X-Forwarded-For`` (it is the edge), so the dashboard instead signs the browser's
address with a key derived from the JWT key, which the gateway can check and nobody else can make.

The key is derived (not the JWT key itself) so the dashboard, which holds no secret that could sign
a token, can be given it. A signature holds its time and is accepted for :data:`MAX_AGE_S`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pms.settings import Settings

#: Header carrying the browser's address, and the one carrying ``<unix time>.<hex HMAC>`` over it.
ADDRESS_HEADER = "X-PMS-Client-Address"
SIGNATURE_HEADER = "X-PMS-Client-Address-Signature"
#: Environment variable through which ``pms serve dashboard`` hands the Streamlit process the key (hex).
KEY_VARIABLE = "PMS_DASHBOARD_FORWARDING_KEY"
#: Seconds a signature stays valid (clock skew between the two processes included).
MAX_AGE_S = 60

_CONTEXT = b"pms: dashboard client address v1"


def derive_key(jwt_secret: str) -> bytes:
    """The forwarding key of a JWT key: usable to vouch for addresses, useless for signing tokens."""
    return hmac.new(jwt_secret.encode(), _CONTEXT, hashlib.sha256).digest()


def key_for(settings: Settings) -> bytes:
    """The forwarding key of the deployment's JWT key."""
    return derive_key(settings.jwt.key())


def _mac(key: bytes, stamp: int, address: str) -> str:
    return hmac.new(key, f"{stamp}|{address}".encode(), hashlib.sha256).hexdigest()


def sign(key: bytes, address: str, *, now: float | None = None) -> dict[str, str]:
    """The two headers that vouch for ``address`` now."""
    stamp = int(time.time() if now is None else now)
    return {ADDRESS_HEADER: address, SIGNATURE_HEADER: f"{stamp}.{_mac(key, stamp, address)}"}


def verified_address(key: bytes, address: str | None, signature: str | None, *,
                     now: float | None = None) -> str | None:
    """``address`` if ``signature`` vouches for it, is recent and the address is an IP address; else None."""
    if not address or not signature or len(address) > 45 or len(signature) > 100:
        return None
    stamp_text, _, mac = signature.partition(".")
    if not (stamp_text.isascii() and stamp_text.isdigit() and mac.isascii()):  # compare_digest refuses non-ASCII str
        return None
    stamp = int(stamp_text)
    if abs((time.time() if now is None else now) - stamp) > MAX_AGE_S:
        return None
    if not hmac.compare_digest(mac, _mac(key, stamp, address)):
        return None
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None
