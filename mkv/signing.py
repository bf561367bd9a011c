"""Signed redirects: a Location that nginx serves only until it expires.

With `redirect-secret` set, the service adds `?md5=<signature>&expires=<unix time>` to
every redirect, and the volume's nginx checks it with its secure_link module
(deploy/nginx; docs/design.md, "Signed redirects"): a link that is unsigned, changed in
any byte, or past its expiry is answered 403 there. The signature is the one that module
computes for `secure_link_md5 "$secure_link_expires$uri <secret>"`: the MD5 of the expiry,
the path as the volume sees it, a space and the secret, in URL-safe base64 without
padding. MD5 is what nginx offers; the secret keeps it unforgeable for its purpose, and
the expiry bounds how long a leaked link serves.

Pure: the caller passes the clock.
"""

from __future__ import annotations

import base64
import hashlib


def signature(path: str, expires: int, secret: str) -> str:
    """The signature nginx expects for `path` (the URI on the volume) until `expires`."""
    raw = hashlib.md5(f"{expires}{path} {secret}".encode(), usedforsecurity=False).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed_query(path: str, now: float, ttl: int, secret: str) -> str:
    """The query string (with its "?") that makes a redirect to `path` valid for `ttl` s."""
    expires = int(now) + ttl
    return f"?md5={signature(path, expires, secret)}&expires={expires}"
