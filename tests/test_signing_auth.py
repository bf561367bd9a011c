"""Pure parts of signed redirects (mkv.signing) and write tokens (mkv.service.auth)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mkv.auth import Auth, TokenFileError, check, read_tokens
from mkv.signing import redirect_query, signature


def test_signature_is_nginx_secure_link_md5_of_expiry_uri_and_secret() -> None:
    # openssl: printf '2147483647/ab/cd/abcd.1 s3cret' | openssl md5 -binary | base64url
    assert signature("/ab/cd/abcd.1", 2147483647, "s3cret") == "eGEvPs_OfODdOcgvVkAZfw"


def test_a_signed_link_without_hops_carries_the_expiry_now_plus_ttl() -> None:
    """What volumes without failover accept: the link's own signature and expiry only."""
    q = redirect_query("/ab/cd/abcd.1", [], 1000.7, 60, "s3cret")
    assert q == f"?md5={signature('/ab/cd/abcd.1', 1060, 's3cret')}&expires=1060"


def test_one_changed_input_changes_the_signature() -> None:
    base = signature("/p", 100, "k")
    assert len({base, signature("/q", 100, "k"), signature("/p", 101, "k"),
                signature("/p", 100, "K")}) == 4


def test_redirect_query_chains_a_signature_per_hop() -> None:
    """Each hop's signature covers its own URI, "?" and the hops after it, as the volume's
    secure_link_md5 over `$uri?$arg_next` checks it; the last one covers its URI alone."""
    hops = [("b:2/d2", "/d2/ab/cd/abcd.1"), ("c:3", "/ab/cd/abcd.1")]
    q = redirect_query("/d1/ab/cd/abcd.1", hops, 1000.7, 60, "k")
    last = f"c:3~{signature('/ab/cd/abcd.1', 1060, 'k')}"
    middle = f"b:2/d2~{signature('/d2/ab/cd/abcd.1?' + last, 1060, 'k')}"
    first = signature(f"/d1/ab/cd/abcd.1?{middle},{last}", 1060, "k")
    assert q == f"?md5={first}&expires=1060&next={middle},{last}"


def test_redirect_query_unsigned_lists_the_hops() -> None:
    assert redirect_query("/x", [("b:2", "/x"), ("c:3/d", "/d/x")], 0, 0, "") == "?next=b:2,c:3/d"
    assert redirect_query("/x", [], 0, 0, "") == ""


TOKEN = "0123456789abcdef-token"


def tokens_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tokens"
    path.write_text(text)
    return str(path)


def test_tokens_are_read_one_a_line_without_blanks_and_comments(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, f"# ops team\n{TOKEN}\n\n  other-token-of-16+  \n")
    assert read_tokens(path) == (TOKEN.encode(), b"other-token-of-16+")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "short\n", "has space in it!!\n"])
def test_a_tokens_file_that_cannot_protect_anything_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(TokenFileError):
        read_tokens(tokens_file(tmp_path, text))


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="nope"):
        read_tokens(str(tmp_path / "nope"))


@pytest.mark.parametrize("header, verdict", [
    (None, Auth.MISSING), ("", Auth.MISSING), ("Bearer", Auth.MISSING), ("Bearer   ", Auth.MISSING),
    (f"Basic {TOKEN}", Auth.MISSING),
    (f"Bearer {TOKEN}", Auth.OK), (f"bearer {TOKEN}", Auth.OK), (f"  Bearer {TOKEN}  ", Auth.OK),
    (f"Bearer {TOKEN}x", Auth.WRONG), (f"Bearer {TOKEN[:-1]}", Auth.WRONG),
    ("Bearer other-token-of-16+", Auth.OK), ("Bearer ünï", Auth.WRONG),
])
def test_check_says_missing_wrong_or_ok(header: str | None, verdict: Auth) -> None:
    assert check(header, (TOKEN.encode(), b"other-token-of-16+")) is verdict
