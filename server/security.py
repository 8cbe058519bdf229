"""Transport security and client authentication for the coordinator: TLS / mutual TLS, bearer tokens.

Tokens file (`--auth-tokens`): one `OWNER TOKEN` pair per line, `#` starts a comment. OWNER is
a client id, or `operator:NAME` for a person or tool that watches the run. Every call carries
`authorization: Bearer TOKEN` (checked by `BearerTokenInterceptor`):

- the client calls (Register, PollTask, uploads, ...) need a client's token, and `Register`
  additionally requires it to belong to the client id it registers, so one site's token cannot
  impersonate another site;
- GetStatus, WatchStatus and server reflection need an operator's token (they show every
  client's id, sample counts and losses), unless the coordinator runs with `--public-status`;
- the health service stays open, for load balancers and probes.
"""
from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from fedcmp.common.security import SecurityConfigError, read_file

OPEN_METHODS = ("/grpc.health.v1.Health/",)
OPERATOR_METHODS = ("/grpc.reflection.", "/fedcmp.v1.Coordinator/GetStatus", "/fedcmp.v1.Coordinator/WatchStatus")
OPERATOR_PREFIX = "operator:"  # owners of operator tokens; client ids cannot contain ':'


def load_tokens(path: Path) -> dict[str, str]:
    """token -> owner (a client id or `operator:NAME`), from an `OWNER TOKEN` per line file."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(read_file(path, "tokens file").decode().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise SecurityConfigError(f"{path}:{number}: expected 'CLIENT_ID TOKEN' or 'operator:NAME TOKEN', "
                                      f"got {len(parts)} fields")
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


def is_operator(owner: str | None) -> bool:
    return owner is not None and owner.startswith(OPERATOR_PREFIX)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right kind of bearer token: a client's, or for status an operator's."""

    def __init__(self, tokens: dict[str, str], public_status: bool = False) -> None:
        self.tokens = tokens
        self.public_status = public_status

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS) or (self.public_status and method.startswith(OPERATOR_METHODS)):
            return await continuation(handler_call_details)
        owner = token_owner(self.tokens, bearer_token(handler_call_details.invocation_metadata))
        if method.startswith(OPERATOR_METHODS):
            refusal = "" if is_operator(owner) else \
                "status needs an operator's bearer token (fedcmp-status --token-file; 'operator:NAME TOKEN' lines)"
        else:
            refusal = "" if owner is not None and not is_operator(owner) else \
                "missing or unknown client bearer token (see --token-file)"
        handler = await continuation(handler_call_details)
        return _refusal(handler, refusal) if refusal else handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that fails with UNAUTHENTICATED."""
    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
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
