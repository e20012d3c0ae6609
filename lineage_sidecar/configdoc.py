"""Generate docs/configuration.md from the declarations in `lineage_sidecar.config`.

Run `python -m lineage_sidecar.configdoc > docs/configuration.md`; a test fails when the
committed file and the declarations disagree, so the reference cannot drift.
"""

from __future__ import annotations

import json

import msgspec
import msgspec.inspect as mi

from agent.config import SECRET_MAX_BYTES
from lineage_sidecar.config import ENV_PREFIX, Config

HEADER = f"""# Configuration reference

Generated from `lineage_sidecar/config.py` by `python -m lineage_sidecar.configdoc`; do not
edit by hand. One YAML file holds every section. Any field can be overridden from the
environment: `{ENV_PREFIX}<SECTION>__<FIELD>[__<FIELD>]`, e.g. `{ENV_PREFIX}PROXY__WORKERS=4`
(values are read as YAML, so `true`, `4` and `[a, b]` work). A field inside a list item
(`auth.jwt_issuers[0].issuer`) has no variable of its own: give the whole list, e.g.
`{ENV_PREFIX}AUTH__JWT_ISSUERS='[{{issuer: "https://idp", audiences: [api], jwks_url: "https://idp/jwks"}}]'`.
Fields marked *secret* take
`file:/path` or `env:NAME`; the file must be a regular file (symlinks are followed) of at
most {SECRET_MAX_BYTES // 1024} KiB, as the configuration file must be one of at most 1 MB
(docs/security.md, "Secrets in configuration"). A bad value stops the command with exit
status 2 and one line naming the field.
"""


def _type_name(info: mi.Type) -> str:
    if isinstance(info, mi.Metadata):
        # A string declared to hold a file:/env: reference is a secret to the reader.
        if info.extra and info.extra.get("secret"):
            return "secret"
        return _type_name(info.type)
    if isinstance(info, mi.UnionType):
        return " or ".join(_type_name(t) for t in info.types)
    if isinstance(info, mi.LiteralType):
        return " or ".join(json.dumps(v) for v in info.values)
    if isinstance(info, mi.ListType):
        return f"list of {_type_name(info.item_type)}"
    if isinstance(info, mi.SetType | mi.FrozenSetType):
        # Written as a YAML list; a value given twice counts once.
        return f"list of {_type_name(info.item_type)} (unique)"
    if isinstance(info, mi.TupleType | mi.VarTupleType):
        inner = info.item_type if isinstance(info, mi.VarTupleType) else info.item_types[0]
        return f"list of {_type_name(inner)}"
    if isinstance(info, mi.StructType):
        return info.cls.__name__
    if isinstance(info, mi.CustomType):
        return "secret"
    names = {
        mi.StrType: "string",
        mi.IntType: "integer",
        mi.FloatType: "number",
        mi.BoolType: "boolean",
        mi.NoneType: "null",
    }
    name = names.get(type(info))
    if name is None:
        # A type not named above would leak msgspec's class name into the reference.
        raise TypeError(f"configdoc: no reader's name for {type(info).__name__}")
    return name


def _bounds(info: mi.Type) -> str:
    if isinstance(info, mi.Metadata):
        return _bounds(info.type)
    if isinstance(info, mi.UnionType):
        return " ".join(b for b in (_bounds(t) for t in info.types) if b)
    parts = []
    for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        value = getattr(info, attr, None)
        if value is not None:
            parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _description(info: mi.Type) -> str:
    if isinstance(info, mi.Metadata) and info.extra_json_schema:
        return str(info.extra_json_schema.get("description", ""))
    return ""


def _default(field: mi.Field) -> str:
    if field.required:
        return "required"
    if field.default_factory is not msgspec.NODEFAULT:
        return json.dumps(field.default_factory())
    return json.dumps(msgspec.to_builtins(field.default))


def _struct_of(info: mi.Type) -> tuple[mi.StructType, str] | None:
    """A nested section: a struct, an optional struct, or a list of structs."""
    if isinstance(info, mi.Metadata):
        return _struct_of(info.type)
    if isinstance(info, mi.StructType):
        return info, ""
    if isinstance(info, mi.UnionType):
        structs = [t for t in info.types if isinstance(t, mi.StructType)]
        if len(structs) == 1 and len(info.types) == 2:
            return structs[0], " (optional section)"
    if isinstance(info, mi.ListType) and isinstance(info.item_type, mi.StructType):
        return info.item_type, "[]"
    return None


def _section(info: mi.StructType, path: str, out: list[str], note: str = "") -> None:
    doc = " ".join((info.cls.__doc__ or "").split())
    out += [
        "",
        f"## `{path}`{note}",
        "",
        doc,
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    nested: list[tuple[str, mi.StructType, str]] = []
    for field in info.fields:
        section = _struct_of(field.type)
        if section is not None:
            child, kind = section
            if kind == "[]":
                # A list of structs is a field of its own, with its items described below.
                nested.append((f"{path}.{field.name}[]", child, " (each item)"))
            else:
                nested.append((f"{path}.{field.name}", child, kind))
                continue
        bounds = _bounds(field.type)
        kind_name = _type_name(field.type) + (f" ({bounds})" if bounds else "")
        text = _description(field.type).replace("|", "\\|")
        out.append(f"| `{field.name}` | {kind_name} | `{_default(field)}` | {text} |")
    for child_path, child, child_note in nested:
        _section(child, child_path, out, child_note)


def render() -> str:
    root = mi.type_info(Config)
    assert isinstance(root, mi.StructType)
    out = [HEADER.rstrip()]
    for field in root.fields:
        section = _struct_of(field.type)
        assert section is not None, field.name
        _section(section[0], field.name, out, section[1])
    return "\n".join(out) + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
