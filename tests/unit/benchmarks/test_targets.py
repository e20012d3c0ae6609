"""Later modes extend the generated proxy config without losing what the harness set."""

from __future__ import annotations

from benchmarks._targets import merged


def test_mode_config_merges_into_the_generated_one() -> None:
    base = {"proxy": {"listen": "127.0.0.1:1", "tls": {"enabled": True}}, "log": {"a": None}}
    extra = {"proxy": {"tls": {"min_version": "1.2"}}, "auth": {"jwt": {"issuer": "x"}}}
    assert merged(base, extra) == {
        "proxy": {"listen": "127.0.0.1:1", "tls": {"enabled": True, "min_version": "1.2"}},
        "log": {"a": None},
        "auth": {"jwt": {"issuer": "x"}},
    }
    assert base["proxy"] == {"listen": "127.0.0.1:1", "tls": {"enabled": True}}  # unchanged
