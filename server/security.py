"""Transport security and client authentication for the coordinator: TLS / mutual TLS, bearer tokens.

Tokens file (`--auth-tokens`): one `CLIENT_ID TOKEN` pair per line, `#` starts a comment. Every
Coordinator RPC except the read-only status calls must carry `authorization: Bearer TOKEN`
(checked by `BearerTokenInterceptor`); `Register` additionally requires the token to belong to
the client id it registers, so one site's token cannot impersonate another site.
"""
from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from fedcmp.common.security import SecurityConfigError, read_file

OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/fedcmp.v1.Coordinator/GetStatus",
                "/fedcmp.v1.Coordinator/WatchStatus")


def load_tokens(path: Path) -> dict[str, str]:
    """token -> client id, from a `CLIENT_ID TOKEN` per line file."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(read_file(path, "tokens file").decode().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise SecurityConfigError(f"{path}:{number}: expected 'CLIENT_ID TOKEN', got {len(parts)} fields")
        client_id, token = parts
        if len(token) < 16:
            raise SecurityConfigError(f"{path}:{number}: the token of {client_id} is shorter than 16 characters")
        if token in tokens:
            raise SecurityConfigError(f"{path}:{number}: a token is listed twice")
        tokens[token] = client_id
    if not tokens:
        raise SecurityConfigError(f"{path} lists no tokens")
    return tokens


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


def token_owner(tokens: dict[str, str], token: str) -> str | None:
    """The client a token belongs to (constant-time comparison against every known token)."""
    owner = None
    for known, client_id in tokens.items():
        if secrets.compare_digest(known, token):
            owner = client_id
    return owner


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects Coordinator calls without a known bearer token (status, health, reflection stay open)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return await continuation(handler_call_details)
        if token_owner(self.tokens, bearer_token(handler_call_details.invocation_metadata)) is None:
            return _refusal(await continuation(handler_call_details))
        return await continuation(handler_call_details)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that fails with UNAUTHENTICATED."""
    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token (see --token-file)")

    async def deny_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token (see --token-file)")
        yield  # pragma: no cover - makes this an async generator for server-streaming methods

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS with the given certificate chain; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(read_file(key, "TLS key"), read_file(cert, "TLS certificate"))],
        root_certificates=read_file(client_ca, "client CA") if client_ca else None,
        require_client_auth=client_ca is not None)
