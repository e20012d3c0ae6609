"""`agent.config.load_file`: what `python -m agent.agent|agent.ingest --config` reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import AgentProcessConfig, IngestProcessConfig, load_file
from lineage_sidecar.config import AGENT_SECTIONS, INGEST_SECTIONS, ConfigError, load_process


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("agent:\n  spool_dir: /a\n  spool_dir: /b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"duplicate key 'spool_dir' \(first on line 2\)"):
        load_file(path, AgentProcessConfig)


def test_a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    os.mkfifo(path)
    with pytest.raises(ValueError, match=r"cannot read: not a regular file \(a FIFO\)"):
        load_file(path, AgentProcessConfig)


def test_an_endless_file_is_refused_without_reading_it_all() -> None:
    with pytest.raises(ValueError, match=r"/dev/zero: cannot read: not a regular file"):
        load_file("/dev/zero", AgentProcessConfig)


def test_a_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("# " + "x" * 1_000_000 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"larger than 1000000 bytes"):
        load_file(path, AgentProcessConfig)


def test_nesting_too_deep_for_the_parser_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("agent: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"agent\.yaml: nested too deeply"):
        load_file(path, AgentProcessConfig)


# (section, process config, the sections `lineage-sidecar` reads for it, default listener)
PROCESSES = [
    ("agent", AgentProcessConfig, AGENT_SECTIONS, "127.0.0.1:9902"),
    ("ingest", IngestProcessConfig, INGEST_SECTIONS, "127.0.0.1:9903"),
]


@pytest.mark.parametrize(("section", "kind", "sections", "default"), PROCESSES)
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("127.0.0.1:70000", "port 70000 is out of range"),
        ("[1:2:3]:9902", "is not an IPv6 address"),
        ("host/x:9902", "must be host:port"),
        ("no port", "Expected `str` matching regex"),
    ],
)
def test_a_bad_admin_listen_is_refused_naming_the_field(
    tmp_path: Path,
    section: str,
    kind: type[AgentProcessConfig | IngestProcessConfig],
    sections: tuple[str, ...],
    default: str,
    value: str,
    problem: str,
) -> None:
    path = tmp_path / f"{section}.yaml"
    path.write_text(f'{section}:\n  admin_listen: "{value}"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{section}\.admin_listen") as refused:
        load_file(path, kind)
    assert problem in str(refused.value)
    # The main configuration's loader (lineage-sidecar agent|ingest) refuses it the same way.
    with pytest.raises(ConfigError, match=rf"{section}\.admin_listen") as refused_by_cli:
        load_process(path, kind, sections, environ={})
    assert problem in str(refused_by_cli.value)


@pytest.mark.parametrize(("section", "kind", "sections", "default"), PROCESSES)
def test_the_admin_listener_is_on_loopback_by_default_and_null_turns_it_off(
    tmp_path: Path,
    section: str,
    kind: type[AgentProcessConfig | IngestProcessConfig],
    sections: tuple[str, ...],
    default: str,
) -> None:
    path = tmp_path / f"{section}.yaml"
    path.write_text(f"{section}: {{}}\n", encoding="utf-8")
    assert getattr(load_file(path, kind), section).admin_listen == default
    path.write_text(f"{section}:\n  admin_listen: null\n", encoding="utf-8")
    assert getattr(load_file(path, kind), section).admin_listen is None
    config = load_process(path, kind, sections, environ={})
    assert isinstance(config, kind)
    assert getattr(config, section).admin_listen is None
