"""Write tokens: who may change keys (and, with `auth-reads`, read them).

`api-tokens-file` holds one token a line (blank lines and lines starting with # are
skipped). A request that needs a token sends `Authorization: Bearer <token>`: none is
401, one that matches no token is 403. Every configured token is compared, in constant
time, whatever matches, so the time taken says nothing about a token's bytes. Tokens
never reach a log line or a metric label. The file is read when a worker starts, so a
SIGHUP (which replaces the workers) picks up a changed file (docs/design.md, "Tokens").
"""

from __future__ import annotations

import enum
import hmac
from pathlib import Path


class TokenFileError(ValueError):
    """The tokens file cannot be read, or holds no token."""


class Auth(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # 401
    WRONG = "wrong"  # 403


def read_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of the file, in order; TokenFileError if it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path}: {exc}") from exc
    tokens = tuple(line.strip().encode() for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise TokenFileError(f"{path}: no token in the file")
    for token in tokens:
        if len(token) < 16 or any(c <= 0x20 or c >= 0x7f for c in token):
            raise TokenFileError(f"{path}: a token must be at least 16 printable ASCII "
                                 "characters without spaces")
    return tokens


def check(header: str | None, tokens: tuple[bytes, ...]) -> Auth:
    """Pure: the verdict on an Authorization header against the configured tokens."""
    if not header:
        return Auth.MISSING
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return Auth.MISSING
    given = credential.strip().encode("latin-1", errors="replace")
    matched = False
    for token in tokens:  # every one, no early exit
        matched |= hmac.compare_digest(given, token)
    return Auth.OK if matched else Auth.WRONG
