"""TLS material and bearer tokens as both sides of the wire read them."""
from __future__ import annotations

from pathlib import Path

import grpc


class SecurityConfigError(ValueError):
    """A TLS or token file that cannot be used; the message names the file."""


def read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {what} {path}: {error.strerror}") from error


def channel_credentials(ca: Path | None, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """Client side: trust `ca` (system roots if None); present `cert`/`key` for mutual TLS."""
    if (cert is None) != (key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=read_file(ca, "CA certificate") if ca else None,
        private_key=read_file(key, "TLS key") if key else None,
        certificate_chain=read_file(cert, "TLS certificate") if cert else None)


def bearer_metadata(token_file: Path) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying the token stored in `token_file` (its first non-empty line)."""
    token = read_file(token_file, "token file").decode().strip().splitlines()
    if not token or not token[0].strip():
        raise SecurityConfigError(f"token file {token_file} is empty")
    return (("authorization", f"Bearer {token[0].strip()}"),)
