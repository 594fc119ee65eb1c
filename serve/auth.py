"""Bearer-token authentication and TLS credentials for the ``grpc.aio`` server and its clients.

Server: :class:`TokenAuthInterceptor` checks ``authorization: Bearer <token>`` on every call but
health checks; :func:`server_credentials` builds TLS or mutual-TLS credentials. Clients:
:func:`metadata` per call (plain-text channels too), :func:`channel_credentials` and
:func:`composite_credentials` for TLS channels.

The auth scheme is matched case-insensitively (``Bearer``, ``bearer``, ``BEARER``): RFC 7235
section 2.1 makes HTTP auth schemes case-insensitive and RFC 6750 inherits that. The token itself
is case-sensitive and must be an RFC 6750 ``b64token``; the scheme and token are separated by one
or more spaces (``1*SP``) and nothing may follow the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

import grpc

HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
_HEADER = re.compile(r"bearer +(" + _TOKEN.pattern + r")", re.IGNORECASE)
_REJECTED = "missing or invalid bearer token"  # never echoes what the client sent


def _check_token(token: object, index: int) -> str:
    """Returns ``token`` if it is a usable bearer token; errors name its position, not its value."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        # A token that can never appear in a valid header is a configuration mistake: fail loudly.
        raise ValueError(f"token #{index + 1} is empty or not an RFC 6750 b64token")
    return token


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the token length.
    return hashlib.sha256(token.encode("ascii")).digest()


async def _reject(request_iterator, context: grpc.aio.ServicerContext):
    """Stream-stream behaviour that aborts before reading or deserializing any request."""
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REJECTED)
    yield b""  # pragma: no cover - unreachable; makes this an async generator


# One rejecting handler serves every method kind: cardinality only decides how the *server* reads
# requests, and this one reads none, so unary and streaming clients alike get UNAUTHENTICATED
# without their (untrusted) request bytes ever reaching a deserializer.
_REJECT_HANDLER = grpc.stream_stream_rpc_method_handler(_reject)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid ``authorization: Bearer <token>`` header.

    Covers unary-unary, unary-stream, stream-unary and stream-stream methods alike: the check runs
    on the call's metadata before any handler is looked up, and an accepted call gets the
    downstream handler unchanged (its serializers and behaviour untouched). Unauthenticated calls to
    unknown methods also get UNAUTHENTICATED, so method names are not revealed to them.

    Args:
        tokens: Accepted tokens (non-empty RFC 6750 ``b64token`` strings); at least one.
        exempt: Full method names served without a token (health checks by default, so load
            balancers and orchestrators need no secret).

    Raises:
        ValueError: If no token is given or one is empty or malformed.
    """

    def __init__(self, tokens: Iterable[str], exempt: Iterable[str] = HEALTH_METHODS) -> None:
        checked = [_check_token(token, i) for i, token in enumerate(tokens)]
        if not checked:
            raise ValueError("at least one token is required")
        self._digests = tuple(_digest(token) for token in checked)
        self._exempt = frozenset(exempt)

    def authorized(self, invocation_metadata) -> bool:
        """Whether the metadata carries exactly one ``authorization`` header with an accepted token.

        Args:
            invocation_metadata: The call's ``(key, value)`` pairs (keys are lowercase in gRPC).

        Returns:
            True if the bearer token is one of the accepted tokens.
        """
        values = [value for key, value in invocation_metadata or () if key == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return False  # absent, or ambiguous duplicates: refuse rather than pick one
        match = _HEADER.fullmatch(values[0])
        if match is None:
            return False
        presented = _digest(match.group(1))
        matched = False
        for accepted in self._digests:
            # No early exit: compare all, so timing shows neither which nor whether one matched.
            matched |= hmac.compare_digest(presented, accepted)
        return matched

    async def intercept_service(self, continuation, handler_call_details):
        """Passes exempt and authorized calls on; answers all others with UNAUTHENTICATED."""
        if handler_call_details.method in self._exempt:
            return await continuation(handler_call_details)
        if not self.authorized(handler_call_details.invocation_metadata):
            return _REJECT_HANDLER
        return await continuation(handler_call_details)


def load_tokens(value: str) -> list[str]:
    """Parses accepted tokens from a comma-separated string or an ``@file``.

    Args:
        value: ``"tok1,tok2"`` or ``"@/path/to/tokens"``; the file holds one token per line, blank
            lines and lines starting with ``#`` are ignored. Surrounding whitespace is stripped.

    Returns:
        The tokens, in order.

    Raises:
        ValueError: If no token remains or one is not an RFC 6750 ``b64token``.
        OSError: If the ``@file`` cannot be read.
    """
    if value.startswith("@"):
        items = [line.strip() for line in Path(value[1:]).read_text("utf-8").splitlines()]
        items = [item for item in items if item and not item.startswith("#")]
    else:
        items = [item for item in (part.strip() for part in value.split(",")) if item]
    if not items:
        raise ValueError("no tokens given")
    return [_check_token(item, i) for i, item in enumerate(items)]


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()  # gRPC wants PEM bytes, not paths


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for the server; mutual TLS when ``client_ca_file`` is given.

    Args:
        cert_file: PEM server certificate chain.
        key_file: PEM private key of that certificate.
        client_ca_file: PEM CA bundle; if given, clients must present a certificate it signed.

    Returns:
        Credentials for ``server.add_secure_port``.
    """
    return grpc.ssl_server_credentials(
        [(_read(key_file), _read(cert_file))],
        root_certificates=_read(client_ca_file),
        require_client_auth=client_ca_file is not None,
    )


def channel_credentials(
    ca_file: str | Path | None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials for a client channel.

    Args:
        ca_file: PEM CA bundle to verify the server with; None uses the system roots.
        cert_file: PEM client certificate chain, for servers requiring mutual TLS.
        key_file: PEM private key of ``cert_file``; given together with it or not at all.

    Returns:
        Credentials for ``grpc.aio.secure_channel``.

    Raises:
        ValueError: If only one of ``cert_file`` and ``key_file`` is given.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file must be given together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``token``; pass as ``metadata=`` on each call.

    Works on plain-text channels, where gRPC refuses to send call credentials.
    """
    return (("authorization", f"Bearer {token}"),)


def composite_credentials(
    channel_creds: grpc.ChannelCredentials, token: str
) -> grpc.ChannelCredentials:
    """TLS channel credentials that attach ``authorization: Bearer <token>`` to every call."""
    # access_token_call_credentials sends exactly "authorization: Bearer <token>"; gRPC attaches
    # call credentials only on secure channels.
    call_creds = grpc.access_token_call_credentials(token)
    return grpc.composite_channel_credentials(channel_creds, call_creds)
