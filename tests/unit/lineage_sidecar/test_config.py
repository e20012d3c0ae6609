"""Configuration: parsed once, validated, overridable from the environment, clear errors."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import SECRET_MAX_BYTES, AgentProcessConfig, IngestProcessConfig, KeysConfig
from lineage_sidecar.config import (
    AGENT_SECTIONS,
    INGEST_SECTIONS,
    Config,
    ConfigError,
    Secret,
    from_mapping,
    load,
    load_process,
    parse_listen,
    parse_upstream,
    read_mapping,
)

MINIMAL = {"proxy": {"upstream": "http://127.0.0.1:8001"}}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_are_safe(tmp_path: Path) -> None:
    config = load(write(tmp_path, MINIMAL), environ={})
    assert config.proxy.listen == "127.0.0.1:8443"
    assert config.proxy.tls.enabled is True
    assert config.proxy.tls.min_version == "1.3"
    assert config.admin.listen.startswith("127.0.0.1:")
    assert config.proxy.trusted_proxies == []


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(write(tmp_path, MINIMAL), environ={})
    with pytest.raises(AttributeError):
        config.proxy.workers = 4  # type: ignore[misc]


def test_environment_overrides_nested_fields(tmp_path: Path) -> None:
    env = {
        "LINEAGE_SIDECAR_PROXY__WORKERS": "4",
        "LINEAGE_SIDECAR_PROXY__TLS__ENABLED": "false",
        "LINEAGE_SIDECAR_PROXY__TRUSTED_PROXIES": "[10.0.0.0/8, 192.168.0.0/16]",
        "UNRELATED": "x",
    }
    config = load(write(tmp_path, MINIMAL), environ=env)
    assert config.proxy.workers == 4
    assert config.proxy.tls.enabled is False
    assert config.proxy.trusted_proxies == ["10.0.0.0/8", "192.168.0.0/16"]


def test_environment_override_of_unknown_field_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"proxy: Object contains unknown field `wrokers`"):
        load(write(tmp_path, MINIMAL), environ={"LINEAGE_SIDECAR_PROXY__WROKERS": "2"})


def test_secret_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "key-password"
    secret_file.write_text("s3cret\n")
    data = {"proxy": {**MINIMAL["proxy"], "tls": {"key_password": f"file:{secret_file}"}}}
    config = load(write(tmp_path, data), environ={})
    assert config.proxy.tls.key_password == Secret("s3cret", "x")
    assert "s3cret" not in repr(config)
    monkeypatch.setenv("TLS_KEY_PASSWORD", "from-env")
    data["proxy"]["tls"]["key_password"] = "env:TLS_KEY_PASSWORD"  # type: ignore[index]
    config = load(write(tmp_path, data), environ={})
    assert config.proxy.tls.key_password is not None
    assert config.proxy.tls.key_password.value == "from-env"


def test_missing_secret_names_the_field(tmp_path: Path) -> None:
    data = {"proxy": {**MINIMAL["proxy"], "tls": {"key_password": "env:NO_SUCH_VARIABLE_X"}}}
    with pytest.raises(ConfigError, match=r"proxy\.tls\.key_password.*NO_SUCH_VARIABLE_X"):
        load(write(tmp_path, data), environ={})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"Object missing required field `proxy`"),
        ({"proxy": {}}, r"proxy\.upstream: required"),
        (
            {"proxy": {"upstream": "http://a:1", "workers": "two"}},
            r"proxy\.workers: Expected `int`",
        ),
        (
            {"proxy": {"upstream": "http://a:1", "workers": 0}},
            r"proxy\.workers: Expected `int` >= 1",
        ),
        ({"proxy": {"upstream": "http://a:1"}, "extra": 1}, r"unknown field `extra`"),
        ({"proxy": {"upstream": "http://a:1", "listen": "8443"}}, r"proxy\.listen"),
        (
            {"proxy": {"upstream": "http://a:1", "listen": "host:70000"}},
            r"proxy\.listen: port 70000",
        ),
        ({"proxy": {"upstream": "http://a:1", "listen": "[::zz]:80"}}, r"proxy\.listen"),
        ({"proxy": {"upstream": "https://a:1"}}, r"proxy\.upstream: only http://"),
        ({"proxy": {"upstream": "a:1"}}, r"proxy\.upstream: expected http://"),
        (
            {"proxy": {"upstream": "http://a:1", "tls": {"min_version": "1.1"}}},
            r"proxy\.tls\.min_version",
        ),
        (
            {"proxy": {"upstream": "http://a:1", "tls": {"cert_file": "/x"}}},
            r"proxy\.tls: give both",
        ),
        (
            {"proxy": {"upstream": "http://a:1", "trusted_proxies": ["nope"]}},
            r"trusted_proxies\[0\]",
        ),
        ({"proxy": {"upstream": "http://a:1"}, "admin": {"listen": "x"}}, r"admin\.listen"),
        (
            {"proxy": {"upstream": "http://a:1"}, "capture": {"flush_interval_s": 0}},
            r"capture\.flush_interval_s",
        ),
        (
            {"proxy": {"upstream": "http://a:1"}, "capture": {"flush_interval_s": 3600}},
            r"capture\.flush_interval_s",
        ),
        (
            {"proxy": {"upstream": "http://a:1"}, "capture": {"body_excerpt_bytes": 1 << 20}},
            r"capture\.body_excerpt_bytes",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_field(
    tmp_path: Path, data: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(write(tmp_path, data), environ={})
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "config.yaml"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("proxy: [unclosed", r"config\.yaml:\d+: "),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("a: " + "[" * 5000 + "]" * 5000, r"config\.yaml"),
        ("x" * 1_100_000, r"larger than 1 MB"),
        ("proxy: !!python/object:os.system {}", r"config\.yaml"),
    ],
)
def test_malformed_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), environ={})


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.yaml", environ={})
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load(binary, environ={})


def test_shipped_example_configs_load() -> None:
    for path in sorted(Path(__file__).resolve().parents[3].joinpath("config").glob("*.yaml")):
        assert isinstance(load(path, environ={}), Config), path


_OVERRIDE = re.compile(r"\b(LINEAGE_SIDECAR_[A-Z0-9_]+)=(\S+)")


def test_override_examples_in_the_shipped_configs_work() -> None:
    """Each comment line of `VARIABLE=value` assignments is one example: applied together,
    they load, and each sets the field it names."""
    examples = 0
    for path in sorted(Path(__file__).resolve().parents[3].joinpath("config").glob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            environ = dict(_OVERRIDE.findall(line)) if line.lstrip().startswith("#") else {}
            if not environ:
                continue
            examples += 1
            config: Any = load(path, environ=environ)
            for name, value in environ.items():
                node = config
                for part in name.removeprefix("LINEAGE_SIDECAR_").lower().split("__"):
                    node = getattr(node, part)
                assert str(node) == value, f"{path}:{number}: {name}"
    assert examples


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_parse_listen_accepts_only_host_and_port(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except ValueError:
        return
    assert 0 <= port <= 65535
    assert host
    for forbidden in " /@":
        assert forbidden not in host


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_parse_upstream_never_accepts_userinfo_query_or_fragment(text: str) -> None:
    try:
        upstream = parse_upstream(text)
    except ValueError:
        return
    assert upstream.scheme == "http"
    for forbidden in "@?#":
        assert forbidden not in text
    assert 0 < upstream.port <= 65535


def test_from_mapping_does_not_read_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LINEAGE_SIDECAR_PROXY__WORKERS", "9")
    assert from_mapping({"proxy": {"upstream": "http://a:1"}}).proxy.workers == 1


def test_configuration_reference_matches_the_declarations() -> None:
    from lineage_sidecar.configdoc import render

    committed = Path(__file__).resolve().parents[3].joinpath("docs", "configuration.md")
    assert committed.read_text() == render(), (
        "docs/configuration.md is stale: run "
        "python -m lineage_sidecar.configdoc > docs/configuration.md"
    )


def test_every_field_in_the_reference_has_a_type_and_a_meaning() -> None:
    from lineage_sidecar.configdoc import render

    rows = [line for line in render().splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:
        name, kind, _default, meaning = (cell.strip() for cell in row.strip("|").split(" | ", 3))
        assert meaning, f"{name} has no description"
        assert "Type" not in kind, f"{name}: {kind}"


def test_the_reference_marks_secret_references() -> None:
    from lineage_sidecar.configdoc import render

    text = render()
    assert "| `token` | secret | `required` |" in text
    assert '| `dsn` | secret | `"env:LS_PG_DSN"` |' in text
    assert "| `header_names` | list of string (unique) | `[]` |" in text


@pytest.mark.parametrize(
    ("derive", "field"),
    [
        ({"max_sql_bytes": -5}, "derive.max_sql_bytes"),
        ({"max_sql_bytes": 1 << 30}, "derive.max_sql_bytes"),
        ({"runs": {"idle_timeout_ns": 0}}, "derive.runs.idle_timeout_ns"),
        ({"runs": {"max_open_runs": 0}}, "derive.runs.max_open_runs"),
        ({"runs": {"run_header": "X-Run-Id"}}, "derive.runs.run_header"),
        ({"runs": {"job_namespace": ""}}, "derive.runs.job_namespace"),
        ({"redaction": {"header_names": [""]}}, "derive.redaction.header_names"),
        ({"max_sql_byte": 1}, "derive"),
    ],
)
def test_derive_values_out_of_bounds_are_refused(
    tmp_path: Path, derive: object, field: str
) -> None:
    path = write(tmp_path, {**MINIMAL, "derive": derive})
    with pytest.raises(ConfigError, match=rf"{path}: {field}[:\[]") as info:
        load_process(path, AgentProcessConfig, AGENT_SECTIONS, environ={})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=field):
        load(path, environ={})


# ---- keys: a local keyring or Vault Transit -------------------------------------------

VAULT = {"address": "https://vault.example:8200", "token": "file:/run/secrets/vault-token"}


def load_keys(tmp_path: Path, keys: object, environ: dict[str, str] | None = None) -> KeysConfig:
    path = write(tmp_path, {**MINIMAL, "keys": keys})
    config = load_process(path, AgentProcessConfig, AGENT_SECTIONS, environ=environ or {})
    return config.keys


def test_vault_keys_load_with_defaults_and_environment_overrides(tmp_path: Path) -> None:
    keys = load_keys(tmp_path, {"provider": "vault", "vault": VAULT})
    assert keys.vault is not None
    assert (keys.vault.mount, keys.vault.key_name, keys.vault.tls_verify) == (
        "transit",
        "lineage",
        True,
    )
    assert keys.vault.timeout == 5.0
    env = {
        "LINEAGE_SIDECAR_KEYS__VAULT__TOKEN": "env:INGESTER_VAULT_TOKEN",
        "LINEAGE_SIDECAR_KEYS__VAULT__KEY_NAME": "lineage-eu",
    }
    keys = load_keys(tmp_path, {"provider": "vault", "vault": VAULT}, env)
    assert keys.vault is not None
    assert (keys.vault.token, keys.vault.key_name) == ("env:INGESTER_VAULT_TOKEN", "lineage-eu")
    ingest = load_process(
        write(tmp_path, {"keys": {"provider": "vault", "vault": VAULT}}),
        IngestProcessConfig,
        INGEST_SECTIONS,
        environ={},
    )
    assert ingest.keys.provider == "vault"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"provider": "vault"}, r"keys\.vault: required when keys\.provider is vault"),
        ({"vault": VAULT}, r"keys\.vault: set, but keys\.provider is local"),
        ({"provider": "hsm"}, r"keys\.provider: Invalid enum value .hsm."),
        ({"provider": "vault", "vault": {"address": "https://v"}}, r"keys\.vault: .*`token`"),
        ({"provider": "vault", "vault": {**VAULT, "tokne": "x"}}, r"keys\.vault: .*`tokne`"),
        (
            {"provider": "vault", "vault": {**VAULT, "token": "s.hunter2-inline"}},
            r"keys\.vault\.token: give a file:PATH or env:NAME reference",
        ),
        ({"provider": "vault", "vault": {**VAULT, "token": "env:"}}, r"keys\.vault\.token"),
        ({"provider": "vault", "vault": {**VAULT, "address": "vault:8200"}}, r"vault\.address"),
        ({"provider": "vault", "vault": {**VAULT, "address": "ftp://v"}}, r"vault\.address"),
        (
            {"provider": "vault", "vault": {**VAULT, "address": "https://u:p@v:8200"}},
            r"keys\.vault\.address: no user",
        ),
        (
            {"provider": "vault", "vault": {**VAULT, "address": "https://v:99999"}},
            r"keys\.vault\.address: Port out of range",
        ),
        ({"provider": "vault", "vault": {**VAULT, "mount": "/transit/"}}, r"keys\.vault\.mount"),
        ({"provider": "vault", "vault": {**VAULT, "key_name": "a/b"}}, r"keys\.vault\.key_name"),
        ({"provider": "vault", "vault": {**VAULT, "key_name": ""}}, r"keys\.vault\.key_name"),
        (
            {"provider": "vault", "vault": {**VAULT, "ca_file": "/ca.pem", "tls_verify": False}},
            r"keys\.vault\.ca_file: set, but keys\.vault\.tls_verify is false",
        ),
        (
            {
                "provider": "vault",
                "vault": {**VAULT, "address": "http://127.0.0.1:8200", "ca_file": "/ca.pem"},
            },
            r"keys\.vault\.ca_file: set, but keys\.vault\.address is not https://",
        ),
        ({"provider": "vault", "vault": {**VAULT, "timeout": 0}}, r"keys\.vault\.timeout"),
    ],
)
def test_bad_keys_section_is_one_line_naming_the_field(
    tmp_path: Path, keys: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_keys(tmp_path, keys)
    assert "\n" not in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"keys": {"provider": "vault"}}, r"keys\.vault: required"),
        ({"kafka": {"max_message_bytes": 10_000_000, "max_request_bytes": 2_000_000}}, "kafka"),
    ],
)
def test_the_proxy_check_also_checks_the_agent_sections(section: object, message: str) -> None:
    # One file often configures the whole sidecar; `proxy --check` must not pass what
    # `agent --check` would refuse.
    raw = {"proxy": {"upstream": "http://a:1"}}
    assert isinstance(section, dict)
    raw.update(section)
    with pytest.raises(ConfigError, match=message) as info:
        from_mapping(raw)
    assert "\n" not in str(info.value)


# ---- what a config file or an override can hold ----------------------------------------


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_environment_override_names_the_variable(tmp_path: Path, depth: int) -> None:
    env = {"LINEAGE_SIDECAR_PROXY__TRUSTED_PROXIES": "[" * depth + "]" * depth}
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, MINIMAL), environ=env)
    assert str(info.value) == "LINEAGE_SIDECAR_PROXY__TRUSTED_PROXIES: nested too deeply"


@contextlib.contextmanager
def memory_ceiling(extra: int = 512 << 20) -> Iterator[None]:
    """Cap this process's address space for the block: code that reads an endless file
    fails with MemoryError instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    ceiling = pages * os.sysconf("SC_PAGE_SIZE") + extra
    resource.setrlimit(resource.RLIMIT_AS, (ceiling if hard < 0 else min(ceiling, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO whose writing end a thread opens once and closes: code that opens the FIFO
    and waits for data reads an end of file instead of hanging the test."""
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: os.close(os.open(path, os.O_WRONLY)), daemon=True)
    writer.start()
    try:
        yield path
    finally:
        while writer.is_alive():
            # Nothing opened the reading end (the FIFO was refused unopened or opened
            # before the writer): opening it here lets the writer's open return.
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            writer.join(0.05)


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def with_redis_password(tmp_path: Path, reference: str) -> Path:
    return write(tmp_path, {**MINIMAL, "redis": {"url": "redis://x", "password": reference}})


def test_secret_file_that_is_a_fifo_is_refused_unopened(tmp_path: Path) -> None:
    with fifo(tmp_path / "password") as path, pytest.raises(ConfigError) as info:
        load(with_redis_password(tmp_path, f"file:{path}"), environ={})
    assert str(info.value) == (
        f"{tmp_path / 'config.yaml'}: redis.password: secret file {str(path)!r}: "
        "not a regular file (a FIFO)"
    )


def test_secret_file_that_is_a_device_is_refused(tmp_path: Path) -> None:
    with memory_ceiling(), pytest.raises(ConfigError) as info:
        load(with_redis_password(tmp_path, "file:/dev/zero"), environ={})
    assert str(info.value).endswith(
        "redis.password: secret file '/dev/zero': not a regular file (a character device)"
    )


def test_secret_file_is_read_up_to_its_limit(tmp_path: Path) -> None:
    huge = sparse_file(tmp_path / "huge", 4 << 30)
    with memory_ceiling(), pytest.raises(ConfigError) as info:
        load(with_redis_password(tmp_path, f"file:{huge}"), environ={})
    assert str(info.value).endswith(
        f"redis.password: secret file {str(huge)!r}: larger than 65536 bytes"
    )
    largest = tmp_path / "largest"
    largest.write_text("k" * SECRET_MAX_BYTES)
    config = load(with_redis_password(tmp_path, f"file:{largest}"), environ={})
    assert config.redis is not None
    assert config.redis.password is not None
    assert len(config.redis.password.value) == SECRET_MAX_BYTES


def test_secret_file_behind_symlinks_is_read(tmp_path: Path) -> None:
    # A Kubernetes secret volume: password -> ..data/password, ..data -> ..2024_01_01/.
    version = tmp_path / "..2024_01_01"
    version.mkdir()
    (version / "password").write_text("s3cret\n")
    (tmp_path / "..data").symlink_to(version.name)
    (tmp_path / "password").symlink_to("..data/password")
    config = load(with_redis_password(tmp_path, f"file:{tmp_path / 'password'}"), environ={})
    assert config.redis is not None
    assert config.redis.password == Secret("s3cret", "x")


def test_resolved_secret_that_is_not_a_file_names_the_field(tmp_path: Path) -> None:
    issuer = {"issuer": "https://idp.example", "shared_secret": "file:/dev/null"}
    data = {**MINIMAL, "auth": {"jwt_issuers": [issuer]}}
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, data), environ={})
    assert str(info.value).endswith(
        "auth.jwt_issuers[0].shared_secret: secret file '/dev/null': "
        "not a regular file (a character device)"
    )


def test_config_file_that_is_a_fifo_is_refused_unopened(tmp_path: Path) -> None:
    with fifo(tmp_path / "config.yaml") as path, pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(info.value) == f"{path}: not a regular file (a FIFO); --config must name a YAML file"


def test_config_file_that_is_a_device_is_refused(tmp_path: Path) -> None:
    with memory_ceiling(), pytest.raises(ConfigError) as info:
        load("/dev/zero", environ={})
    assert str(info.value) == (
        "/dev/zero: not a regular file (a character device); --config must name a YAML file"
    )


def test_config_file_is_read_up_to_its_limit(tmp_path: Path) -> None:
    huge = sparse_file(tmp_path / "huge.yaml", 4 << 30)
    with memory_ceiling(), pytest.raises(ConfigError) as info:
        load_process(huge, AgentProcessConfig, AGENT_SECTIONS, environ={})
    assert str(info.value) == f"{huge}: larger than 1 MB; this is not a configuration file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "proxy:\n  upstream: http://a:1\nadmin: {listen: '127.0.0.1:1'}\nproxy: {workers: 2}\n",
            ":4: duplicate key 'proxy' (first on line 1)",
        ),
        (
            "proxy:\n  upstream: http://a:1\n  tls:\n    enabled: false\n    enabled: true\n",
            ":5: duplicate key 'enabled' (first on line 4)",
        ),
        (
            "proxy: {upstream: 'http://a:1', workers: 2, workers: 3}\n",
            ":1: duplicate key 'workers'",
        ),
    ],
)
def test_duplicate_key_is_refused_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(info.value).startswith(f"{path}{message}")
    with pytest.raises(ConfigError) as info:
        load_process(path, AgentProcessConfig, AGENT_SECTIONS, environ={})
    assert str(info.value).startswith(f"{path}{message}")


def test_duplicate_key_in_an_environment_override_names_the_variable(tmp_path: Path) -> None:
    env = {"LINEAGE_SIDECAR_PROXY__TLS": "{enabled: false, enabled: true}"}
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, MINIMAL), environ=env)
    assert str(info.value) == (
        "LINEAGE_SIDECAR_PROXY__TLS: duplicate key 'enabled' (first on line 1)"
    )


def test_keys_merged_from_an_anchor_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "x-defaults: &limits {max_headers: 50, max_header_bytes: 4096}\n"
        "proxy:\n  limits:\n    <<: *limits\n    max_headers: 60\n"
    )
    raw = read_mapping(write(tmp_path, text))
    assert raw["proxy"]["limits"] == {"max_headers": 60, "max_header_bytes": 4096}


def test_an_inline_secret_warning_names_the_field(caplog: pytest.LogCaptureFixture) -> None:
    raw = {
        "proxy": {"upstream": "http://a:1", "tls": {"key_password": "pw"}},
        "redis": {"url": "redis://127.0.0.1:6379", "password": "hunter2"},
    }
    with caplog.at_level(logging.WARNING, logger="lineage_sidecar.config"):
        config = from_mapping(raw)
    assert config.redis is not None
    assert config.redis.password == Secret("hunter2", "inline")
    assert [r.getMessage() for r in caplog.records] == [
        "config field proxy.tls.key_password holds an inline secret; prefer file: or env:",
        "config field redis.password holds an inline secret; prefer file: or env:",
    ]
    assert "hunter2" not in caplog.text
