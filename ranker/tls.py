"""TLS for the gRPC service: server credentials from PEM files, and the matching client side.

The server takes a certificate chain and its private key, and optionally a CA whose clients it
requires (mutual TLS). Clients take the CA that signed the server's certificate and, for mutual
TLS, their own certificate and key. Files are read once, at start-up, and every problem with
them (missing, unreadable, not PEM) is a :class:`TlsConfigError` naming the file and the option.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from training.errors import ReelrankError

_log = logging.getLogger(__name__)


class TlsConfigError(ReelrankError):
    """A certificate or key file that cannot be used; names the file and what is wrong."""


@dataclass(frozen=True)
class ServerTls:
    """The server's TLS files, all PEM."""

    cert_file: Path
    """Certificate chain presented to clients (``--tls-cert``)."""
    key_file: Path
    """Private key of that certificate (``--tls-key``)."""
    client_ca_file: Path | None = None
    """CA of the clients to accept; when given, clients without its certificate are refused."""


@dataclass(frozen=True)
class ClientTls:
    """A client's TLS files, all PEM."""

    ca_file: Path
    """CA that signed the server's certificate (``--tls-ca``)."""
    cert_file: Path | None = None
    """The client's own certificate, for servers that require one (``--tls-client-cert``)."""
    key_file: Path | None = None
    """Its private key (``--tls-client-key``)."""


def read_pem(path: Path, option: str, kind: str) -> bytes:
    """The bytes of PEM file ``path``; ``kind`` is the block it must hold ("CERTIFICATE",
    "PRIVATE KEY"). Raises :class:`TlsConfigError` naming ``option`` and the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{option} {path}: is a directory, not a PEM file") from None
    except PermissionError:
        raise TlsConfigError(f"{option} {path}: not readable by this user") from None
    except OSError as error:
        raise TlsConfigError(f"{option} {path}: cannot be read: {error.strerror}") from None

    # "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY" blocks.
    if f"{kind}-----".encode() not in data or b"-----BEGIN " not in data:
        raise TlsConfigError(f"{option} {path}: holds no PEM {kind} block")
    return data


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """gRPC server credentials for ``tls``; the files are read here."""
    cert = read_pem(tls.cert_file, "--tls-cert", "CERTIFICATE")
    key = read_pem(tls.key_file, "--tls-key", "PRIVATE KEY")
    client_ca = None
    if tls.client_ca_file is not None:
        client_ca = read_pem(tls.client_ca_file, "--tls-client-ca", "CERTIFICATE")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """gRPC channel credentials for ``tls``; the files are read here."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise TlsConfigError("--tls-client-cert and --tls-client-key must be given together")
    ca = read_pem(tls.ca_file, "--tls-ca", "CERTIFICATE")
    cert = key = None
    if tls.cert_file is not None:
        cert = read_pem(tls.cert_file, "--tls-client-cert", "CERTIFICATE")
        key = read_pem(tls.key_file, "--tls-client-key", "PRIVATE KEY")
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def open_channel(target: str, tls: ClientTls | None = None, options=None) -> grpc.Channel:
    """A channel to ``target``: TLS when ``tls`` is given, plain TCP otherwise."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(tls), options=options)
