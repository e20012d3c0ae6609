"""`lineage-sidecar ... --check` run as a real command: a configuration it cannot use ends
with exit status 2 and one line on standard error, never a traceback."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

CLI = str(Path(sys.executable).with_name("lineage-sidecar"))
MINIMAL = {"proxy": {"upstream": "http://127.0.0.1:1", "tls": {"enabled": False}}}


def limit_memory() -> None:
    # A command that reads an endless file stops at MemoryError, not at the machine's end.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))


def check(config: Path | str, env: dict[str, str] | None = None) -> str:
    """Run `proxy --check`, assert the one-line refusal and return that line."""
    # The timeout only keeps a regression from hanging the suite; the command is expected
    # to answer at once.
    result = subprocess.run(
        [CLI, "proxy", "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
        preexec_fn=limit_memory,
    )
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert (result.returncode, len(lines)) == (2, 1), result.stderr
    assert lines[0].startswith("lineage-sidecar: configuration error: ")
    return lines[0]


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_deeply_nested_environment_override(tmp_path: Path) -> None:
    name = "LINEAGE_SIDECAR_PROXY__TRUSTED_PROXIES"
    line = check(write(tmp_path, MINIMAL), {name: "[" * 1000 + "]" * 1000})
    assert line.endswith(f"{name}: nested too deeply")


def test_secret_file_that_is_a_device_or_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "password"
    os.mkfifo(fifo)
    for secret in ("/dev/zero", str(fifo)):
        redis = {"url": "redis://127.0.0.1:6379", "password": f"file:{secret}"}
        line = check(write(tmp_path, {**MINIMAL, "redis": redis}))
        assert f"redis.password: secret file {secret!r}: not a regular file" in line


def test_config_that_is_a_device_or_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "sidecar.yaml"
    os.mkfifo(fifo)
    for config, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO")):
        line = check(config)
        assert f"{config}: not a regular file ({kind}); --config must name a YAML" in line


def test_duplicate_key(tmp_path: Path) -> None:
    config = write(tmp_path, "proxy: {upstream: 'http://127.0.0.1:1'}\nproxy: {workers: 2}\n")
    assert check(config).endswith(f"{config}:2: duplicate key 'proxy' (first on line 1)")


def _with_files(tmp_path: Path) -> dict[str, object]:
    """A proxy configuration naming a certificate, a users file and policy files, all present."""
    policies = Path(__file__).resolve().parents[2] / "policies"
    for name in ("cert.pem", "key.pem", "users.yaml"):
        (tmp_path / name).write_text("present\n")
    return {
        "proxy": {
            "upstream": "http://127.0.0.1:1",
            "listen": "127.0.0.1:0",
            "tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")},
        },
        "admin": {"listen": "127.0.0.1:0"},
        "auth": {
            "idp": {
                "issuer": "http://127.0.0.1:1/_sidecar",
                "audience": "sidecar",
                "users_file": str(tmp_path / "users.yaml"),
            }
        },
        "policy": {
            "model": str(policies / "model.conf"),
            "policies": [str(policies / "policy.csv")],
            "routes": str(policies / "routes.yaml"),
            "audit_log": str(tmp_path / "audit.jsonl"),
        },
    }


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The timeout only keeps a regression (a proxy that starts) from hanging the suite.
    return subprocess.run(
        [CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_check_passes_when_the_named_files_exist(tmp_path: Path) -> None:
    path = write(tmp_path, _with_files(tmp_path))
    result = run("proxy", "--check", "--config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, f"{path}: ok")


@pytest.mark.parametrize(
    ("section", "field", "shown"),
    [
        ("proxy.tls", "cert_file", "proxy.tls.cert_file"),
        ("proxy.tls", "key_file", "proxy.tls.key_file"),
        ("auth.idp", "users_file", "auth.idp.users_file"),
        ("policy", "model", "policy.model"),
        ("policy", "routes", "policy.routes"),
        ("policy", "policies", "policy.policies[0]"),
    ],
)
def test_a_missing_named_file_is_a_configuration_error(
    tmp_path: Path, section: str, field: str, shown: str
) -> None:
    """`--check` refuses what the real start would fail on, and the real start refuses it
    the same way: exit 2, one line naming the field."""
    config = _with_files(tmp_path)
    node: Any = config
    for part in section.split("."):
        node = node[part]
    missing = str(tmp_path / "missing")
    node[field] = [missing] if field == "policies" else missing
    path = write(tmp_path, config)
    expected = f"{path}: {shown}: {missing!r}: cannot read: No such file or directory"
    assert check(path).endswith(expected)
    started = run("proxy", "--config", str(path), cwd=tmp_path)
    assert (started.returncode, started.stderr.strip().splitlines()) == (
        2,
        [f"lineage-sidecar: configuration error: {expected}"],
    )


def test_a_named_file_that_is_a_directory(tmp_path: Path) -> None:
    config = _with_files(tmp_path)
    config["policy"]["routes"] = str(tmp_path)  # type: ignore[index]
    assert check(write(tmp_path, config)).endswith(
        f"policy.routes: {str(tmp_path)!r}: not a regular file"
    )
