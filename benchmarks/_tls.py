"""A throw-away certificate authority and server certificate for TLS targets.

nginx and the sidecar proxy are given the same ECDSA P-256 certificate for 127.0.0.1,
so their TLS handshakes and record encryption cost the same; the CA file lets the
harness verify each TLS target properly before measuring it. The pair is the proxy's own
development pair (`proxy.tls.generate_dev_pair`), so there is one generator to trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.tls import generate_dev_pair

KEY_DESCRIPTION = "ECDSA P-256, SHA-256 signature"


@dataclass(frozen=True)
class TestPki:
    """Paths of the generated PEM files."""

    ca_file: Path
    cert_file: Path  # server certificate followed by the CA certificate (chain)
    key_file: Path
    key_description: str = KEY_DESCRIPTION


def make_test_pki(directory: Path) -> TestPki:
    """Write a CA and a server certificate for 127.0.0.1/localhost into `directory`."""
    paths = generate_dev_pair(directory, hosts=("127.0.0.1", "localhost", "::1"))
    assert paths.ca_file is not None
    return TestPki(ca_file=paths.ca_file, cert_file=paths.cert_file, key_file=paths.key_file)
