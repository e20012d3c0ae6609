"""Recognise the Casbin model shapes the compiled engine decides on its own.

A model is read by pycasbin's own parser (so sections, comments and continuation lines
mean exactly what they mean to pycasbin), checked for what every engine needs, and then
matched against the shapes `compiled.py` implements: one request and one policy type, an
allow/deny effect, and a matcher that is a conjunction of terms each comparing one request
field with one policy field:

    g(r.sub, p.sub)   g(r.sub, p.sub, r.dom)           role inheritance, with domains
    r.x == p.x        (r.x == p.x || p.x == "*")        equality, optionally with a wildcard
    keyMatch(r.x, p.x)  keyMatch2(..)  globMatch(..)  regexMatch(..)

Anything else gets `Shape.unsupported` set to the reason, and the engine falls back to a
pycasbin enforcer. Being wrong here would make decisions differ from pycasbin, so every
test is strict: an unexpected node, keyword, operator or name means "unsupported".
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from casbin.model import Model

from proxy.authz.matching import PATTERN_FUNCTIONS

EffectKind = Literal["allow-override", "deny-override", "allow-and-deny", "other"]

# The effect expressions as pycasbin stores them (after `p.` became `p_`).
EFFECTS: Final[dict[str, EffectKind]] = {
    "some(where (p_eft == allow))": "allow-override",
    "!some(where (p_eft == deny))": "deny-override",
    "some(where (p_eft == allow)) && !some(where (p_eft == deny))": "allow-and-deny",
    "priority(p_eft) || deny": "other",
    "subjectPriority(p_eft) || deny": "other",
}

# Functions a matcher may call in pycasbin 2.8 besides the role functions g, g2, ...:
# its function map and the constructors simpleeval's EvalWithCompoundTypes adds.
KNOWN_FUNCTIONS: Final = frozenset(
    {
        "keyMatch",
        "keyMatch2",
        "keyMatch3",
        "keyMatch4",
        "keyMatch5",
        "regexMatch",
        "ipMatch",
        "globMatch",
        "timeMatch",
        "list",
        "tuple",
        "dict",
        "set",
    }
)

REQUIRED_SECTIONS: Final = (
    ("r", "request_definition"),
    ("p", "policy_definition"),
    ("e", "policy_effect"),
    ("m", "matchers"),
)


class PolicyError(ValueError):
    """A model or policy cannot be used; the message names the file (and line) and why."""


@dataclass(frozen=True)
class RoleTerm:
    """`g(r.<subject>, p.<field>[, r.<domain>])`."""

    role_type: str
    request_index: int
    policy_index: int
    domain_index: int | None


@dataclass(frozen=True)
class FieldTerm:
    """A matching function of one request field and one policy field."""

    function: str  # "==", "==|const", or a key of PATTERN_FUNCTIONS
    request_index: int
    policy_index: int
    constant: str = ""


Term = RoleTerm | FieldTerm


@dataclass
class Shape:
    """What the engines need to know about a parsed model."""

    model: Any  # casbin.model.Model, untyped upstream
    request_fields: tuple[str, ...]
    policy_fields: tuple[str, ...]
    effect: EffectKind
    effect_expression: str
    role_types: dict[str, int]  # "g" -> number of fields in its grouping lines
    terms: tuple[Term, ...] = ()
    unsupported: str | None = None

    @property
    def effect_index(self) -> int | None:
        return self.policy_fields.index("eft") if "eft" in self.policy_fields else None


# Every section pycasbin reads; it keeps any other silently, and ignores what is in it.
MODEL_SECTIONS: Final = frozenset(
    {"request_definition", "policy_definition", "role_definition", "policy_effect", "matchers"}
)


def _check_section_names(text: str, source: str) -> None:
    """Refuse a section pycasbin would keep and never read (`[matcher]`, `[foo]`): what is
    written under it would have no effect. Lines are read as pycasbin's config reader
    reads them: stripped, `#` and `;` start comments, `[name]` is a section header."""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line[:1] == "[" and line[-1:] == "]" and line[1:-1] not in MODEL_SECTIONS:
            known = ", ".join(f"[{name}]" for name in sorted(MODEL_SECTIONS))
            raise PolicyError(f"{source}:{number}: unknown section {line}; a model has {known}")


def parse_model(text: str, source: str) -> Shape:
    """Parse and check a model; raise `PolicyError` naming `source` when it is unusable."""
    _check_section_names(text, source)
    model = Model()
    try:
        model.load_model_from_text(text)
    except (RuntimeError, ValueError, IndexError, KeyError) as exc:
        raise PolicyError(f"{source}: {exc}") from exc
    for key, section in REQUIRED_SECTIONS:
        # casbin's Model has `__getitem__` (returning None when absent) but no `__contains__`.
        if model[key] is None or key not in model[key]:
            raise PolicyError(f"{source}: missing [{section}] with `{key} = ...`")

    request_fields = _field_names(model["r"]["r"].tokens, "r")
    policy_fields = _field_names(model["p"]["p"].tokens, "p")
    for what, names in (
        ("request_definition", request_fields),
        ("policy_definition", policy_fields),
    ):
        if len(set(names)) != len(names) or not all(names):
            raise PolicyError(f"{source}: [{what}] has empty or repeated field names: {names}")

    effect_expression = model["e"]["e"].value
    effect = EFFECTS.get(effect_expression)
    if effect is None:
        raise PolicyError(f"{source}: unsupported [policy_effect] {effect_expression!r}")

    role_types: dict[str, int] = {}
    if model["g"] is not None:
        for name, assertion in model["g"].items():
            role_types[name] = assertion.value.count("_")
            if role_types[name] < 2:
                raise PolicyError(f"{source}: role definition {name} needs at least `_, _`")

    shape = Shape(
        model=model,
        request_fields=request_fields,
        policy_fields=policy_fields,
        effect=effect,
        effect_expression=effect_expression,
        role_types=role_types,
    )
    matcher = model["m"]["m"].value
    tree = _parse_matcher(matcher, source)
    _check_names(tree, shape, source)
    try:
        shape.terms = _terms(tree, shape)
    except _Unsupported as exc:
        shape.unsupported = str(exc)
    else:
        shape.unsupported = _unsupported_model(shape)
    return shape


def _field_names(tokens: list[str], prefix: str) -> tuple[str, ...]:
    return tuple(token[len(prefix) + 1 :] for token in tokens)


def _parse_matcher(matcher: str, source: str) -> ast.expr:
    """Parse the matcher the way pycasbin's `_get_expression` rewrites it."""
    expression = matcher.replace("&&", "and").replace("||", "or")
    expression = re.sub(r"!(?!=)", "not ", expression)
    try:
        module = ast.parse(expression.strip())
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise PolicyError(f"{source}: [matchers] is not a valid expression: {matcher!r}") from exc
    if len(module.body) != 1 or not isinstance(module.body[0], ast.Expr):
        raise PolicyError(f"{source}: [matchers] must be a single expression: {matcher!r}")
    return module.body[0].value


def _check_names(tree: ast.expr, shape: Shape, source: str) -> None:
    """Reject unknown functions and fields now, not on the first request that reaches them."""
    callable_names = KNOWN_FUNCTIONS | shape.role_types.keys() | {"eval"}
    variables: set[str] = set()
    for section in ("r", "p"):
        for assertion in shape.model[section].values():
            variables.update(assertion.tokens)
    called: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called.add(id(node.func))
            if node.func.id not in callable_names:
                raise PolicyError(f"{source}: [matchers] calls unknown function {node.func.id}()")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in called and node.id not in variables:
            shown = re.sub(r"^([rp]\d*)_", r"\1.", node.id)
            raise PolicyError(f"{source}: [matchers] uses {shown}, which no definition declares")


class _Unsupported(Exception):
    pass


def _terms(tree: ast.expr, shape: Shape) -> tuple[Term, ...]:
    conjuncts: list[ast.expr] = []
    _flatten_and(tree, conjuncts)
    terms = tuple(_term(node, shape) for node in conjuncts)
    used = [term.policy_index for term in terms]
    if len(set(used)) != len(used):
        raise _Unsupported("a policy field is tested by more than one term")
    if sum(isinstance(term, RoleTerm) for term in terms) > 1:
        raise _Unsupported("more than one role function in the matcher")
    return terms


def _flatten_and(node: ast.expr, into: list[ast.expr]) -> None:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        for value in node.values:
            _flatten_and(value, into)
    else:
        into.append(node)


def _term(node: ast.expr, shape: Shape) -> Term:
    if isinstance(node, ast.Call):
        return _call_term(node, shape)
    if isinstance(node, ast.Compare):
        request_index, policy_index = _equality(node, shape)
        return FieldTerm("==", request_index, policy_index)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and len(node.values) == 2:
        return _wildcard_term(node.values, shape)
    raise _Unsupported(f"matcher term {ast.unparse(node)!r} is not a supported shape")


def _call_term(node: ast.Call, shape: Shape) -> Term:
    if not isinstance(node.func, ast.Name) or node.keywords:
        raise _Unsupported(f"call {ast.unparse(node)!r} is not a supported shape")
    name = node.func.id
    args = node.args
    if name in shape.role_types:
        if len(args) not in (2, 3) or shape.role_types[name] not in (2, 3):
            raise _Unsupported(f"role function {ast.unparse(node)!r} is not a supported shape")
        if shape.model["g"][name].params_tokens:
            raise _Unsupported(f"conditional role definition {name}")
        domain_index = _request_index(args[2], shape) if len(args) == 3 else None
        return RoleTerm(
            name, _request_index(args[0], shape), _policy_index(args[1], shape), domain_index
        )
    if name in PATTERN_FUNCTIONS and len(args) == 2:
        return FieldTerm(name, _request_index(args[0], shape), _policy_index(args[1], shape))
    raise _Unsupported(f"function {name}() is not compiled")


def _equality(node: ast.Compare, shape: Shape) -> tuple[int, int]:
    if len(node.ops) != 1 or not isinstance(node.ops[0], ast.Eq):
        raise _Unsupported(f"comparison {ast.unparse(node)!r} is not a supported shape")
    left, right = node.left, node.comparators[0]
    if _is_request(left, shape):
        return _request_index(left, shape), _policy_index(right, shape)
    return _request_index(right, shape), _policy_index(left, shape)


def _wildcard_term(values: list[ast.expr], shape: Shape) -> FieldTerm:
    """`r.x == p.x || p.x == "c"` in either order, either side of each `==`."""
    equality = next((v for v in values if _compares_fields(v, shape)), None)
    constant = next((v for v in values if v is not equality), None)
    if not isinstance(equality, ast.Compare) or not isinstance(constant, ast.Compare):
        raise _Unsupported("alternative is not `r.x == p.x || p.x == constant`")
    request_index, policy_index = _equality(equality, shape)
    if len(constant.ops) != 1 or not isinstance(constant.ops[0], ast.Eq):
        raise _Unsupported("alternative is not `r.x == p.x || p.x == constant`")
    sides = (constant.left, constant.comparators[0])
    literal = next((s for s in sides if isinstance(s, ast.Constant)), None)
    name = next((s for s in sides if not isinstance(s, ast.Constant)), None)
    if (
        literal is None
        or name is None
        or not isinstance(literal.value, str)
        or _policy_index(name, shape) != policy_index
    ):
        raise _Unsupported("alternative is not `r.x == p.x || p.x == constant`")
    return FieldTerm("==|const", request_index, policy_index, literal.value)


def _compares_fields(node: ast.expr, shape: Shape) -> bool:
    return (
        isinstance(node, ast.Compare)
        and len(node.comparators) == 1
        and (_is_request(node.left, shape) or _is_request(node.comparators[0], shape))
    )


def _is_request(node: ast.expr, shape: Shape) -> bool:
    return isinstance(node, ast.Name) and node.id.startswith("r_")


def _request_index(node: ast.expr, shape: Shape) -> int:
    if isinstance(node, ast.Name) and node.id.startswith("r_"):
        name = node.id[2:]
        if name in shape.request_fields:
            return shape.request_fields.index(name)
    raise _Unsupported(f"{ast.unparse(node)!r} is not a request field")


def _policy_index(node: ast.expr, shape: Shape) -> int:
    if isinstance(node, ast.Name) and node.id.startswith("p_"):
        name = node.id[2:]
        if name in shape.policy_fields:
            return shape.policy_fields.index(name)
    raise _Unsupported(f"{ast.unparse(node)!r} is not a policy field")


def _unsupported_model(shape: Shape) -> str | None:
    """Model-level features the compiled engine does not implement."""
    if shape.effect == "other":
        return f"effect {shape.effect_expression!r} is evaluated by pycasbin"
    if "priority" in shape.policy_fields:
        return "policies with a priority column are ordered by pycasbin"
    if sorted(shape.request_fields) not in (["act", "obj", "sub"], ["act", "dom", "obj", "sub"]):
        return f"request fields {shape.request_fields} are not sub, obj, act [, dom]"
    return None
