"""Tokens file parsing and bearer-token extraction."""
from __future__ import annotations

import pytest

from fedcmp.common.security import SecurityConfigError, bearer_metadata, channel_credentials
from fedcmp.server.security import bearer_token, load_tokens, token_owner

TOKEN_A = "a" * 32
TOKEN_B = "b" * 32


def test_tokens_file_with_comments(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# site tokens\nclient_0 {TOKEN_A}\n\nclient_1 {TOKEN_B}  # second site\n")
    tokens = load_tokens(path)
    assert tokens == {TOKEN_A: "client_0", TOKEN_B: "client_1"}
    assert token_owner(tokens, TOKEN_B) == "client_1" and token_owner(tokens, "c" * 32) is None


@pytest.mark.parametrize("text, message", [
    ("client_0\n", "expected 'CLIENT_ID TOKEN'"),
    ("client_0 short\n", "shorter than 16"),
    (f"a {TOKEN_A}\nb {TOKEN_A}\n", "listed twice"),
    ("# nothing\n", "lists no tokens"),
])
def test_bad_tokens_files_are_named(tmp_path, text, message) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(SecurityConfigError, match=message):
        load_tokens(path)


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(SecurityConfigError, match="cannot read tokens file"):
        load_tokens(tmp_path / "absent")
    with pytest.raises(SecurityConfigError, match="cannot read CA certificate"):
        channel_credentials(tmp_path / "absent.pem", None, None)
    with pytest.raises(SecurityConfigError, match="go together"):
        channel_credentials(None, tmp_path / "cert.pem", None)


def test_bearer_round_trip(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN_A}\n")
    assert bearer_token(bearer_metadata(path)) == TOKEN_A
    assert bearer_token((("authorization", "Basic xyz"),)) == "" and bearer_token(None) == ""
    path.write_text("\n")
    with pytest.raises(SecurityConfigError, match="is empty"):
        bearer_metadata(path)
