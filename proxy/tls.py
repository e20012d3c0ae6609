"""TLS termination: a strict server context, a development CA, and reload from disk.

Promises: TLS 1.3 unless the configuration allows 1.2, and then only ECDHE with AEAD
ciphers; no compression, no renegotiation. Certificates are reloaded from disk into the
same `SSLContext` when their files change, so new handshakes see the new certificate
without a restart; a broken new pair is logged and the old one stays in service.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lineage_sidecar.config import TLSConfig

log = logging.getLogger(__name__)

# TLS 1.2 suites when 1.2 is allowed: forward secret key exchange and AEAD only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1"


@dataclass(frozen=True)
class CertificatePaths:
    """The files a listener serves; `ca_file` is set for the generated development CA."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


def server_context(config: TLSConfig, paths: CertificatePaths) -> ssl.SSLContext:
    """Build the listener's context; raises ssl.SSLError/OSError on a bad certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    password = config.key_password.value if config.key_password is not None else None
    context.load_cert_chain(paths.cert_file, paths.key_file, password=password)
    return context


def resolve_paths(config: TLSConfig) -> CertificatePaths:
    """The configured pair, or the development pair (generated if missing or expiring)."""
    if config.cert_file is not None and config.key_file is not None:
        return CertificatePaths(Path(config.cert_file), Path(config.key_file))
    directory = Path(config.self_signed_dir)
    paths = CertificatePaths(
        directory / "cert.pem", directory / "key.pem", ca_file=directory / "ca.pem"
    )
    if not _dev_pair_usable(paths):
        log.warning(
            "no TLS certificate configured: generated a development CA and certificate in %s "
            "(clients must trust %s); configure proxy.tls.cert_file/key_file for production",
            directory,
            paths.ca_file,
        )
        generate_dev_pair(directory)
    return paths


def _dev_pair_usable(paths: CertificatePaths) -> bool:
    if paths.ca_file is None or not all(
        p.exists() for p in (paths.cert_file, paths.key_file, paths.ca_file)
    ):
        return False
    try:
        cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
    except ValueError:
        return False
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return remaining > datetime.timedelta(days=1)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def generate_dev_pair(
    directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
) -> CertificatePaths:
    """Make a development CA and a server certificate for `hosts`, valid for 30 days."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lineage-sidecar dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write_private(directory / "ca-key.pem", ca_key.private_bytes(pem, pkcs8, no_password))
    _write_private(directory / "key.pem", key.private_bytes(pem, pkcs8, no_password))
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    return CertificatePaths(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")


def _fingerprint(paths: CertificatePaths) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in (paths.cert_file, paths.key_file):
        try:
            st = path.stat()
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class CertificateReloader:
    """Polls the certificate files and loads a changed pair into the live context."""

    def __init__(self, context: ssl.SSLContext, config: TLSConfig, paths: CertificatePaths) -> None:
        self._context = context
        self._config = config
        self._paths = paths
        self._seen = _fingerprint(paths)
        self._failed: tuple[tuple[int, int, int], ...] | None = None
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None

    def check(self) -> bool:
        """Reload if the files changed; returns True when a new pair went into service."""
        current = _fingerprint(self._paths)
        if current in (self._seen, self._failed):
            return False
        password = self._config.key_password.value if self._config.key_password else None
        try:
            # Validate on a scratch context first, so a half-written pair never reaches
            # the live one (load_cert_chain may leave a context half-updated on error).
            scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            scratch.load_cert_chain(self._paths.cert_file, self._paths.key_file, password)
            self._context.load_cert_chain(self._paths.cert_file, self._paths.key_file, password)
        except (OSError, ssl.SSLError) as exc:
            # The files may be mid-rotation (cert written, key not yet): the next change
            # of either file is tried again; this exact pair is not retried or re-logged.
            self._failed = current
            self.failures += 1
            self.last_error = f"{self._paths.cert_file}: {exc}"
            log.error("TLS certificate reload failed, keeping the old one: %s", self.last_error)
            return False
        self._seen = current
        self.reloads += 1
        self.last_error = None
        log.info("TLS certificate reloaded from %s", self._paths.cert_file)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._config.reload_interval)
            self.check()
