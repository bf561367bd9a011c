"""Signed redirects: a Location that nginx serves only until it expires.

With `redirect-secret` set, the service adds `?md5=<signature>&expires=<unix time>` to
every redirect, and the volume's nginx checks it with its secure_link module
(deploy/nginx; docs/design.md, "Signed redirects"): a link that is unsigned, changed in
any byte, or past its expiry is answered 403 there. The signature is the one that module
computes for `secure_link_md5 "$secure_link_expires$uri <secret>"`: the MD5 of the expiry,
the path as the volume sees it, a space and the secret, in URL-safe base64 without
padding. MD5 is what nginx offers; the secret keeps it unforgeable for its purpose, and
the expiry bounds how long a leaked link serves.

A redirect may also name the key's other replicas (`next`, docs/design.md, "Read
failover"), which the volume follows itself when it lacks the blob. Unsigned, that is the
list of hops; signed, every hop carries its own signature (its URI differs by its disk
prefix) and every signature covers the rest of the list, so no hop can be changed, added
or dropped without a 403 from the volume that reads it. The secret stays last in what is
hashed, where MD5's length extension cannot append to it.

Pure: the caller passes the clock.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

#: One failover hop: how the volume before it names it (host[:port][/prefix], see
#: deploy/nginx/volume.conf.template) and the URI of the blob there (prefix and blob path).
Hop = tuple[str, str]


def signature(path: str, expires: int, secret: str) -> str:
    """The signature nginx expects for `path` (the URI on the volume) until `expires`."""
    raw = hashlib.md5(f"{expires}{path} {secret}".encode(), usedforsecurity=False).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def redirect_query(path: str, hops: Sequence[Hop], now: float, ttl: int, secret: str) -> str:
    """The query string (with its "?", or "" for none) of a redirect to `path` whose blob
    may also be at `hops`, in order: `next=HOP,HOP` unsigned, and signed
    `md5=&expires=&next=HOP~SIG,HOP~SIG`, each SIG covering its hop's URI and the hops
    after it, as the volume checks it (secure_link_md5 over `$uri?$arg_next`)."""
    if not secret:
        return "?next=" + ",".join(name for name, _ in hops) if hops else ""
    expires = int(now) + ttl
    rest = ""
    for name, hop_path in reversed(hops):
        sig = signature(hop_path + "?" + rest if rest else hop_path, expires, secret)
        rest = f"{name}~{sig},{rest}" if rest else f"{name}~{sig}"
    sig = signature(path + "?" + rest if rest else path, expires, secret)
    return f"?md5={sig}&expires={expires}&next={rest}" if rest else f"?md5={sig}&expires={expires}"
