"""The demo's configuration: `--config FILE` overrides any field, at any depth."""

from __future__ import annotations

from pathlib import Path

from lineage_sidecar.demo import demo_config, merge_config


def test_merge_overrides_mappings_key_by_key_at_any_depth() -> None:
    base = {"proxy": {"listen": "a", "tls": {"self_signed_dir": "d", "min_version": "1.3"}}}
    overrides = {"proxy": {"tls": {"min_version": "1.2"}}, "log": {"level": "debug"}}
    assert merge_config(base, overrides) == {
        "proxy": {"listen": "a", "tls": {"self_signed_dir": "d", "min_version": "1.2"}},
        "log": {"level": "debug"},
    }
    # The inputs are left as they were.
    assert base["proxy"]["tls"] == {"self_signed_dir": "d", "min_version": "1.3"}


def test_merge_replaces_anything_that_is_not_two_mappings() -> None:
    base = {"policy": {"policies": ["a.csv", "b.csv"], "admin_path": "/x"}, "auth": {"idp": {}}}
    overrides = {"policy": {"policies": ["c.csv"], "admin_path": None}, "auth": None}
    assert merge_config(base, overrides) == {
        "policy": {"policies": ["c.csv"], "admin_path": None},
        "auth": None,
    }
    assert merge_config({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert merge_config({"a": {"b": 2}}, {"a": 1}) == {"a": 1}


def test_a_nested_override_keeps_the_demo_certificate_directory(tmp_path: Path) -> None:
    """`proxy: {tls: {min_version: "1.2"}}` changes the version only: the proxy keeps the
    demo's CA directory, the one the lineage API and the printed curl lines use."""
    overrides = {"proxy": {"tls": {"min_version": "1.2"}}}
    config = demo_config(
        "127.0.0.1:8443", "127.0.0.1:9901", "http://127.0.0.1:1", tmp_path, overrides
    )
    assert config.proxy.tls.min_version == "1.2"
    assert config.proxy.tls.self_signed_dir == str(tmp_path / "tls")
    assert config.proxy.listen == "127.0.0.1:8443"
    assert config.auth is not None
    assert config.auth.idp is not None
    assert config.auth.idp.users_file == str(tmp_path / "users.yaml")
