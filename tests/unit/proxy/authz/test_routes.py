"""Route table: what requests map to, which route wins, and how bad route files fail."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.authz.paths import PathRejected, normalize_path
from proxy.authz.routes import (
    ResourceTemplate,
    Route,
    RouteError,
    RouteMatch,
    RouteTable,
    load_route_file,
    parse_route_file,
    tilde_decode,
)

EXAMPLE = Path(__file__).parents[4] / "policies" / "routes.yaml"


def table_from(text: str, source: str = "routes.yaml") -> RouteTable:
    return parse_route_file(textwrap.dedent(text), source)


def route_error(text: str | bytes, source: str = "routes.yaml") -> RouteError:
    with pytest.raises(RouteError) as caught:
        parse_route_file(textwrap.dedent(text) if isinstance(text, str) else text, source)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{source}:{caught.value.line}: ")
    return caught.value


def matched(table: RouteTable, method: str, target: str) -> RouteMatch | None:
    return table.resolve(method, target)[1]


# -- the shipped example ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasette() -> RouteTable:
    return load_route_file(EXAMPLE)


@pytest.mark.parametrize(
    ("method", "target", "name", "resource", "action"),
    [
        ("GET", "/", "home", "catalog:datasette", "read"),
        ("GET", "/sales?sql=select+*+from+secret", "database", "database:sales", "read"),
        ("GET", "/sales.json?sql=select+1", "database-json", "database:sales", "read"),
        (
            "GET",
            "/sales/-/query.json?sql=select+1",
            "database-query-json",
            "database:sales",
            "read",
        ),
        ("GET", "/sales/orders", "table", "dataset:sales.orders", "read"),
        ("GET", "/sales/orders.json", "table-json", "dataset:sales.orders", "read"),
        ("HEAD", "/sales/orders.csv", "table-csv", "dataset:sales.orders", "read"),
        ("GET", "/sales/orders/17.json", "row-json", "dataset:sales.orders", "read"),
        ("POST", "/sales/orders/-/insert", "insert-rows", "dataset:sales.orders", "write"),
        ("POST", "/sales/orders/17/-/delete", "delete-row", "dataset:sales.orders", "write"),
        ("POST", "/sales/orders/-/drop", "drop-table", "dataset:sales.orders", "admin"),
        ("POST", "/sales/-/create", "create-table", "database:sales", "write"),
        ("GET", "/-/versions.json", "instance-page-json", "admin:datasette", "admin"),
        ("GET", "/-/settings", "instance-page", "admin:datasette", "admin"),
        ("GET", "/-/static/app.css", "static-asset", "static:datasette", "read"),
        ("GET", "/-/static-plugins/vega/js/x.js", "plugin-asset", "static:vega", "read"),
        # Normalization happens first: these are the admin pages, whatever they pretend.
        ("GET", "/public/../-/settings", "instance-page", "admin:datasette", "admin"),
        ("GET", "//-/settings", "instance-page", "admin:datasette", "admin"),
        ("GET", "/%2D/settings", "instance-page", "admin:datasette", "admin"),
        # A database whose name holds the separator cannot pose as another table.
        ("GET", "/sales.secret/orders", "table", "dataset:sales%2Esecret.orders", "read"),
        ("GET", "/sales/secret.orders", "table", "dataset:sales.secret.orders", "read"),
    ],
)
def test_example_routes_map_requests(
    datasette: RouteTable, method: str, target: str, name: str, resource: str, action: str
) -> None:
    match = matched(datasette, method, target)
    assert match is not None
    assert (match.route.name, match.resource, match.action) == (name, resource, action)


def test_example_carries_sql_and_public_flags(datasette: RouteTable) -> None:
    query = matched(datasette, "GET", "/sales?sql=select+1")
    assert query is not None
    assert query.route.sql is not None
    assert (query.route.sql.location, query.route.sql.param, query.route.sql.dialect) == (
        "query",
        "sql",
        "sqlite",
    )
    asset = matched(datasette, "GET", "/-/static/app.css")
    assert asset is not None
    assert asset.route.public
    table = matched(datasette, "GET", "/sales/orders")
    assert table is not None
    assert not table.route.public


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/sales/orders"),  # no such write endpoint: deny by default
        ("DELETE", "/sales/orders"),
        ("GET", "/sales/orders/17/extra"),
        ("get", "/sales/orders"),  # methods are case-sensitive
        ("GET", "/sales/orders/-/insert"),
    ],
)
def test_example_leaves_unknown_requests_unmatched(
    datasette: RouteTable, method: str, target: str
) -> None:
    assert matched(datasette, method, target) is None


# -- bypass attempts against a protected prefix ----------------------------------------------

GUARDED = """\
    version: 1
    routes:
      - {name: admin, methods: "*", path: /admin, resource: "admin:site", action: admin}
      - name: admin-tree
        methods: "*"
        path: "/admin/{rest:path}"
        resource: "admin:site"
        action: admin
      - name: public-tree
        methods: "*"
        path: "/public/{rest:path}"
        resource: "public:{rest}"
        action: read
        public: true
      - {name: dataset, methods: "*", path: "/{name}", resource: "dataset:{name}", action: read}
"""


@pytest.fixture(scope="module")
def guarded() -> RouteTable:
    return table_from(GUARDED)


@pytest.mark.parametrize(
    "target",
    [
        "/%2e%2e/admin",
        "/public/%2e%2e/%2e%2e/admin",
        "/%2fadmin",
        "/public%2f..%2fadmin",
        "/\\admin",
        "/admin;x",
        "/admin%00",
        "/admin#x",
        "/public/x%23/../admin",
        "/%c0%ae%c0%ae/admin",
        "/public/%c0%ae%c0%ae/admin",
        "http://host/admin",
        "/public/\uff0e\uff0e/admin",
    ],
)
def test_bypass_attempts_get_400(guarded: RouteTable, target: str) -> None:
    with pytest.raises(PathRejected) as caught:
        guarded.resolve("GET", target)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "target",
    [
        "/admin",
        "//admin",
        "/./admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/./../admin/",
        "/%61dmin",
        "/admin/users?/public/x",
        "/admin?x=/public/y",
        "///admin//users",
    ],
)
def test_paths_that_reach_admin_match_the_admin_rule(guarded: RouteTable, target: str) -> None:
    path, match = guarded.resolve("GET", target)
    assert match is not None
    assert match.resource == "admin:site"
    assert path.upstream_path.startswith("/admin")


def test_query_string_never_makes_a_rule_match(guarded: RouteTable) -> None:
    match = matched(guarded, "GET", "/public/x?/admin")
    assert match is not None
    assert match.route.name == "public-tree"
    assert match.params == {"rest": "x"}


def test_letter_case_follows_the_route(guarded: RouteTable) -> None:
    # A case-sensitive admin route does not own /ADMIN; here it falls to the dataset route.
    match = matched(guarded, "GET", "/ADMIN")
    assert match is not None
    assert match.route.name == "dataset"
    insensitive = table_from(
        GUARDED.replace("path: /admin,", "path: /admin, case_insensitive: true,")
    )
    for target in ("/ADMIN", "/Admin", "/aDmIn"):
        match = matched(insensitive, "GET", target)
        assert match is not None
        assert match.route.name == "admin"


def test_exact_and_case_insensitive_routes_side_by_side() -> None:
    table = table_from(
        """\
        routes:
          - {methods: [GET], path: /Key, resource: exact, action: read}
          - {methods: [GET], path: /key, case_insensitive: true, resource: folded, action: read}
          - {methods: [GET], path: "/{name}", resource: "other:{name}", action: read}
        """
    )
    expected = {"/Key": "exact", "/key": "folded", "/KEY": "folded", "/\u212aey": "folded"}
    for target, resource in expected.items():
        match = matched(table, "GET", target)
        assert match is not None
        assert match.resource == resource, target
    assert (other := matched(table, "GET", "/keys")) is not None
    assert other.resource == "other:keys"


# -- specificity ------------------------------------------------------------------------------


def test_more_specific_route_wins_whatever_the_file_order() -> None:
    routes = [
        '{methods: [GET], path: "/{db}/{table}", resource: "t:{db}.{table}", action: read}',
        '{methods: [GET], path: "/{db}/{table}.json", resource: "j:{db}.{table}", action: read}',
        '{methods: [GET], path: "/{db}/-/query", resource: "q:{db}", action: read}',
        '{methods: [GET], path: "/{db}/{rest:path}", resource: "r:{db}", action: read}',
        '{methods: [GET], path: "/sales/{table}", resource: "s:{table}", action: read}',
    ]
    expectations = {
        "/x/y": "t:x.y",
        "/x/y.json": "j:x.y",
        "/x/-/query": "q:x",
        "/x/y/z": "r:x",
        "/sales/y": "s:y",
    }
    for order in itertools.permutations(routes):
        text = "routes:\n" + "".join(f"  - {route}\n" for route in order)
        # /sales/{table} and /{db}/{table}.json overlap on /sales/x.json: settle it.
        text += '  - {methods: [GET], path: "/sales/{t}.json", resource: "sj:{t}", action: read}\n'
        table = parse_route_file(text)
        for target, resource in expectations.items():
            match = matched(table, "GET", target)
            assert match is not None
            assert match.resource == resource
        assert (m := matched(table, "GET", "/sales/y.json")) is not None
        assert m.resource == "sj:y"


def test_overlap_with_neither_more_specific_is_rejected_naming_both() -> None:
    error = route_error(
        """\
        routes:
          - {name: first, methods: [GET], path: "/a/{x}", resource: "r:{x}", action: read}
          - {name: second, methods: [GET, POST], path: "/{y}/b", resource: "r:{y}", action: read}
        """
    )
    assert error.line == 3
    assert "'second'" in error.reason
    assert "'first' (routes.yaml:2)" in error.reason
    assert "/a/b" in error.reason


def test_public_catch_all_cannot_swallow_a_write_endpoint() -> None:
    error = route_error(
        """\
        routes:
          - {methods: [POST], path: "/public/{rest:path}", resource: "p:{rest}", action: read}
          - {methods: [POST], path: "/{db}/-/insert", resource: "d:{db}", action: write}
        """
    )
    assert "/public/-/insert" in error.reason


def test_a_third_route_can_settle_an_overlap() -> None:
    table = table_from(
        """\
        routes:
          - {methods: [GET], path: "/a/{x}", resource: "first:{x}", action: read}
          - {methods: [GET], path: "/{y}/b", resource: "second:{y}", action: read}
          - {methods: [GET], path: "/a/b", resource: "both", action: read}
        """
    )
    for target, resource in {"/a/b": "both", "/a/c": "first:c", "/c/b": "second:c"}.items():
        match = matched(table, "GET", target)
        assert match is not None
        assert match.resource == resource


def test_overlap_across_disjoint_methods_is_fine() -> None:
    table = table_from(
        """\
        routes:
          - {methods: [GET], path: "/a/{x}", resource: "get:{x}", action: read}
          - {methods: [POST], path: "/{y}/b", resource: "post:{y}", action: write}
        """
    )
    get, post = matched(table, "GET", "/a/b"), matched(table, "POST", "/a/b")
    assert get is not None
    assert post is not None
    assert (get.resource, post.resource) == ("get:b", "post:a")


def test_same_requests_twice_is_rejected() -> None:
    error = route_error(
        """\
        routes:
          - {methods: [GET], path: "/t/{a}", resource: "r:{a}", action: read}
          - {methods: [HEAD, GET], path: "/t/{b}", resource: "r:{b}", action: write}
        """
    )
    assert error.line == 3
    assert "exactly the same requests" in error.reason


def test_trailing_slash_and_catch_all_rules() -> None:
    table = table_from(
        """\
        routes:
          - {methods: "*", path: "/files/", resource: "listing", action: read}
          - {methods: "*", path: "/files/{key:path}", resource: "file:{key}", action: read}
        """
    )
    assert (listing := matched(table, "GET", "/files/")) is not None
    assert listing.resource == "listing"
    assert matched(table, "GET", "/files") is None
    assert (nested := matched(table, "PURGE", "/files/a/b/")) is not None
    assert nested.params == {"key": "a/b/"}


# -- opt-ins and raw-path routes ---------------------------------------------------------------

OPT_INS = """\
    routes:
      - name: objects
        methods: [GET, PUT]
        path: "/objects/{bucket}/{key:path}"
        resource: "object:{bucket}/{key}"
        action: read
        allow_encoded_slash: true
      - name: matrix
        methods: [GET]
        path: "/cars/{spec}"
        resource: "car:{spec}"
        action: read
        allow_path_params: true
      - {name: plain, methods: [GET], path: "/{a}/{b}", resource: "plain:{a}", action: read}
      - name: files
        methods: [GET]
        path: "/raw/{dir}/{rest:path}"
        raw_path_policy: keyMatch2
        action: read
"""


def test_encoded_slash_only_where_a_route_opts_in() -> None:
    table = table_from(OPT_INS)
    path, match = table.resolve("GET", "/objects/b1/dir%2Fkey.txt")
    assert match is not None
    assert match.params == {"bucket": "b1", "key": "dir/key.txt"}
    assert path.upstream_path == "/objects/b1/dir%2Fkey.txt"
    with pytest.raises(PathRejected) as caught:
        table.resolve("GET", "/x/a%2Fb")
    assert caught.value.code == "encoded_slash"


def test_path_params_only_where_a_route_opts_in() -> None:
    table = table_from(OPT_INS)
    match = matched(table, "GET", "/cars/audi;color=red")
    assert match is not None
    assert match.resource == "car:audi;color=red"
    with pytest.raises(PathRejected) as caught:
        table.resolve("GET", "/x/admin;x")
    assert caught.value.code == "path_params"


def test_raw_path_route_hands_the_normalized_path_to_policies() -> None:
    table = table_from(OPT_INS)
    match = matched(table, "GET", "/raw/a/../b/c")
    assert match is not None
    assert match.resource == "/raw/b/c"
    assert match.route.raw_path_policy == "keyMatch2"


def test_a_normalized_path_from_strict_options_matches_too() -> None:
    table = table_from(OPT_INS)
    match = table.match("GET", normalize_path("/x/y"))
    assert match is not None
    assert match.resource == "plain:x"


# -- bad route files ---------------------------------------------------------------------------


def one_route(body: str) -> str:
    return "routes:\n  - " + body + "\n"


@pytest.mark.parametrize(
    ("route", "fragment"),
    [
        ('{methods: [GET], path: "/{x", resource: "r", action: read}', "one {name} per segment"),
        ('{methods: [GET], path: "/{x}{y}", resource: "r", action: read}', "one {name}"),
        ('{methods: [GET], path: "/{1x}", resource: "r", action: read}', "one {name}"),
        ('{methods: [GET], path: "/a//b", resource: "r", action: read}', "empty segment"),
        ('{methods: [GET], path: "/{r:path}/x", resource: "r", action: read}', "last segment"),
        ('{methods: [GET], path: "/a{r:path}", resource: "r", action: read}', "last segment"),
        ('{methods: [GET], path: "/{x:int}", resource: "r", action: read}', "unknown placeholder"),
        ('{methods: [GET], path: "a/b", resource: "r", action: read}', "must start with '/'"),
        ('{methods: [GET], path: "/./x", resource: "r", action: read}', "dot-segment"),
        ('{methods: [GET], path: "/\uff0e\uff0e", resource: "r", action: read}', "folds (NFKC)"),
        ('{methods: [GET], path: "/a\uff0fb", resource: "r", action: read}', "folds (NFKC)"),
        ('{methods: [GET], path: "/x{y}\uff0f", resource: "r", action: read}', "folds (NFKC)"),
        ('{methods: [GET], path: "/%41", resource: "r", action: read}', "decoded"),
        ('{methods: [GET], path: "/a;b", resource: "r", action: read}', "allow_path_params"),
        ('{methods: [GET], path: "/{x}/{x}", resource: "r", action: read}', "appears twice"),
        ('{methods: [GET], path: "/{x}", resource: "r:{y}", action: read}', "does not define"),
        ('{methods: [GET], path: "/{x}/{y}", resource: "r:{x}{y}", action: read}', "separated"),
        ('{methods: [GET], path: "/{x}", resource: "r:{x", action: read}', "unbalanced"),
        ('{methods: [GET], path: "/{x}", resource: "", action: read}', "must not be empty"),
        (
            '{methods: [GET], path: "/É", case_insensitive: true, resource: r, action: read}',
            "ASCII",
        ),
        ('{methods: GET, path: "/", resource: r, action: read}', "methods must be"),
        ('{methods: [], path: "/", resource: r, action: read}', "methods must be"),
        ('{methods: ["GE T"], path: "/", resource: r, action: read}', "not an HTTP method"),
        ('{methods: [GET], path: "/", resource: r, action: read, public: "yes"}', "true or false"),
        ("{methods: [GET], path: 7, resource: r, action: read}", "path must be a string"),
        ('{methods: [GET], path: "/", resource: r, action: "read all"}', "spaces"),
        ('{methods: [GET], path: "/", resource: r}', "missing 'action'"),
        ('{methods: [GET], path: "/", action: read}', "missing 'resource'"),
        ('{methods: [GET], path: "/", resource: r, action: read, colour: red}', "unknown key"),
        (
            '{methods: [GET], path: "/", action: read, raw_path_policy: regexMatch}',
            "raw_path_policy must be one of",
        ),
        (
            '{methods: [GET], path: "/", resource: r, action: read, raw_path_policy: keyMatch}',
            "either 'resource' or 'raw_path_policy'",
        ),
        (
            '{methods: [GET], path: "/", resource: r, action: read, sql: {from: header, param: q}}',
            "sql.from",
        ),
        (
            '{methods: [GET], path: "/", resource: r, action: read, sql: {from: body, x: 1}}',
            "unknown key 'x'",
        ),
        ('{methods: [GET], path: "/", resource: r, action: read, sql: {from: body}}', "'param'"),
        ("[not, a, mapping]", "a route must be a mapping"),
    ],
)
def test_invalid_routes_are_rejected_with_file_and_line(route: str, fragment: str) -> None:
    error = route_error("version: 1\n" + one_route(route))
    assert fragment in error.reason
    assert error.line == 3


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", 1, "empty"),
        ("# only a comment\n", 1, "empty"),
        ("- {path: /}\n", 1, "must be a mapping"),
        ("routes: []\n", 1, "every request would be denied"),
        ("routes: {}\n", 1, "'routes' must be a list"),
        ("version: 2\nroutes: []\n", 1, "unsupported route file version"),
        ("version: one\n", 1, "version must be an integer"),
        ("paths: []\n", 1, "unknown key 'paths'"),
        ("version: 1\n", 1, "needs a 'routes' list"),
        ("routes:\n  - {path: /\n", 3, "invalid YAML"),
        ("routes: [\n\n  {a: b}]\n  c: d\n", 4, "invalid YAML"),
        ("routes: []\nroutes: []\n", 2, "duplicate key 'routes'"),
        ("routes: []\n---\nroutes: []\n", 2, "invalid YAML"),
        ("!!python/object:os.system {}\n", 1, "must be a mapping"),
        ("routes: \x07\n", 1, "invalid YAML"),
        (
            "routes:\n  - &r {methods: [GET], path: /a, resource: r, action: read}\n  - *r\n",
            2,  # the alias is the anchored node itself, so it carries the anchor's line
            "aliases are not allowed",
        ),
    ],
)
def test_malformed_route_files_are_rejected(text: str, line: int, fragment: str) -> None:
    error = route_error(text)
    assert fragment in error.reason
    assert error.line == line


def test_duplicate_route_names_are_rejected() -> None:
    error = route_error(
        """\
        routes:
          - {name: t, methods: [GET], path: /a, resource: r, action: read}
          - {name: t, methods: [GET], path: /b, resource: r, action: read}
        """
    )
    assert error.line == 3
    assert "already used by route at routes.yaml:2" in error.reason


def test_hostile_route_files_fail_cleanly(tmp_path: Path) -> None:
    assert "larger than" in route_error(b"#" * (10 * 1024 * 1024)).reason
    assert "nesting" in route_error("routes: " + "[" * 5000 + "]" * 5000).reason
    assert "not valid UTF-8" in route_error(b"routes:\n  - \xff\xfe\n").reason
    laughs = "a: &a [x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20)
    )
    assert "unknown key 'a'" in route_error(laughs).reason
    reused = (
        "routes:\n  - {methods: [GET], path: /a, resource: r, action: &x read}\n"
        "  - {methods: [GET], path: /b, resource: r, action: *x}\n"
    )
    assert "aliases are not allowed" in route_error(reused).reason
    with pytest.raises(RouteError) as caught:
        load_route_file(tmp_path / "missing.yaml")
    assert str(caught.value).startswith(f"{tmp_path / 'missing.yaml'}:1: cannot read")


def test_too_many_routes_are_rejected() -> None:
    routes = "".join(
        f"  - {{methods: [GET], path: /r{i}, resource: r, action: read}}\n" for i in range(1001)
    )
    assert "more than 1000 routes" in route_error("routes:\n" + routes).reason


def test_example_file_is_valid_yaml_with_documented_keys() -> None:
    # The shipped example must load; the loader refusing unknown keys keeps it honest.
    document = yaml.safe_load(EXAMPLE.read_text())
    assert len(load_route_file(EXAMPLE).routes) == len(document["routes"])


# -- properties -------------------------------------------------------------------------------

_ESCAPE_PRONE = st.text(st.sampled_from("ab.%:2E/"), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["dataset:{a}.{b}", "{a}:{b}", "x{a}.:{b}y", "{a}%{b}", "t:{a}.{b}.{a}"]),
    st.tuples(_ESCAPE_PRONE, _ESCAPE_PRONE),
    st.tuples(_ESCAPE_PRONE, _ESCAPE_PRONE),
)
def test_resource_rendering_is_injective(
    template: str, first: tuple[str, str], second: tuple[str, str]
) -> None:
    resource = ResourceTemplate.parse(template, ["a", "b"])
    one = resource.render({"a": first[0], "b": first[1]})
    two = resource.render({"a": second[0], "b": second[1]})
    assert (one == two) == (first == second)


@given(
    st.text(st.sampled_from("ab.-~é\u2024\u2025\uff0e\uff0f\uff05%#?;\\"), min_size=1, max_size=4)
)
def test_a_literal_template_accepted_at_load_is_a_path_requests_can_reach(segment: str) -> None:
    try:
        table = table_from(
            one_route(
                f"{{methods: [GET], path: {json.dumps('/' + segment)}, resource: r, action: read}}"
            )
        )
    except RouteError:
        return
    # A route whose own path normalization refuses would be dead config: never matched.
    normalized = normalize_path(quote("/" + segment, safe="/"))
    assert table.match("GET", normalized) is not None


_SEGMENT_KINDS = st.sampled_from(["a", "b", "x.json", "-", "{}", "{}.json", "x{}"])
_VALUES = st.text(st.sampled_from("abx.-j"), min_size=1, max_size=4).filter(
    lambda value: value not in (".", "..")  # dot-segments are no placeholder values
)
# Every concrete path of up to four segments built from these covers each template shape.
_UNIVERSE_SEGMENTS = ["a", "b", "-", "x.json", "xc", "a.json"]
_UNIVERSE = [
    list(parts) for n in range(1, 5) for parts in itertools.product(_UNIVERSE_SEGMENTS, repeat=n)
]


@st.composite
def route_specs(draw: st.DrawFn) -> tuple[str, frozenset[str], str]:
    kinds = draw(st.lists(_SEGMENT_KINDS, min_size=1, max_size=3))
    segments = [kind.replace("{}", f"{{p{i}}}") for i, kind in enumerate(kinds)]
    if draw(st.booleans()) and len(segments) < 3:
        segments.append("{rest:path}")
    methods = draw(
        st.sampled_from([frozenset({"GET"}), frozenset({"POST"}), frozenset({"GET", "POST"})])
    )
    return "/" + "/".join(segments), methods, draw(st.sampled_from(["read", "write"]))


def _build(specs: list[tuple[str, frozenset[str], str]]) -> RouteTable:
    lines = []
    for i, (path, methods, action) in enumerate(specs):
        names = [part.split(":")[0] for part in path.replace("}", "{").split("{")[1::2]]
        resource = f"r{i}:" + ".".join(f"{{{n}}}" for n in names)
        lines.append(
            f"  - {{name: r{i}, methods: [{', '.join(sorted(methods))}], "
            f"path: '{path}', resource: '{resource}', action: {action}}}\n"
        )
    return parse_route_file("routes:\n" + "".join(lines))


def _conflict_free(
    specs: list[tuple[str, frozenset[str], str]],
) -> list[tuple[str, frozenset[str], str]]:
    kept: list[tuple[str, frozenset[str], str]] = []
    for spec in specs:
        try:
            _build([*kept, spec])
        except RouteError:
            continue
        kept.append(spec)
    return kept


def _route_matches(route: Route, segments: list[str]) -> bool:
    return route.template.match(segments) is not None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(route_specs(), min_size=1, max_size=7), st.data())
def test_generated_route_sets_pick_the_most_specific_route(
    specs: list[tuple[str, frozenset[str], str]], data: st.DataObject
) -> None:
    kept = _conflict_free(specs)
    table = _build(kept)
    universe = {
        route.name: frozenset(i for i, p in enumerate(_UNIVERSE) if _route_matches(route, p))
        for route in table.routes
    }
    # Every concrete path built from a route's template matches that route or a strictly
    # more specific one, and yields the expected resource when it is the route itself.
    for route in table.routes:
        values = {name: data.draw(_VALUES) for name in route.template.names}
        if route.template.catch_all is not None:
            values[route.template.catch_all] = "/".join(
                data.draw(st.lists(_VALUES, min_size=1, max_size=3))
            )
        path = route.template.text
        for name, value in values.items():
            path = path.replace(f"{{{name}:path}}", value).replace(f"{{{name}}}", value)
        method = sorted(route.methods or {"GET"})[0]
        match = matched(table, method, path)
        assert match is not None
        if match.route is route:
            assert match.params == values
            assert route.resource is not None
            assert match.resource == route.resource.render(values)
            assert match.resource.startswith(f"{route.name}:")
        else:
            # More specific, checked by brute force over a finite universe of paths.
            assert universe[match.route.name] <= universe[route.name]
    # On every path of the universe, the route chosen is contained in every route that
    # also matches it (brute-force oracle of "most specific wins").
    for method in ("GET", "POST"):
        candidates = [r for r in table.routes if r.methods is None or method in r.methods]
        for index, segments in enumerate(_UNIVERSE):
            matching = [r for r in candidates if index in universe[r.name]]
            chosen = table.match(method, normalize_path("/" + "/".join(segments)))
            if not matching:
                assert chosen is None
                continue
            assert chosen is not None
            assert chosen.route in matching
            for other in matching:
                assert universe[chosen.route.name] <= universe[other.name]


# -- Datasette's tilde encoding --------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "resource"),
    [
        ("/sales/~73ecret.json", "dataset:sales.secret"),
        ("/sales/secre~74", "dataset:sales.secret"),
        ("/~73ales/secret.csv", "dataset:sales.secret"),
        ("/sales/~73ecret/1.json", "dataset:sales.secret"),
        ("/sales/my+table.json", "dataset:sales.my table"),
        # The separator decoded inside a name stays escaped: it cannot pose as another.
        ("/sales~2Esecret/orders", "dataset:sales%2Esecret.orders"),
        # A literal % (percent-decoded by normalization first) is kept, as Datasette keeps it.
        ("/sales/a%2541.json", "dataset:sales.a%2541"),
    ],
)
def test_the_shipped_routes_read_names_as_datasette_does(
    datasette: RouteTable, target: str, resource: str
) -> None:
    match = matched(datasette, "GET", target)
    assert match is not None
    assert match.resource == resource


def test_tilde_encoding_is_opt_in_per_file_and_per_route() -> None:
    for default, flag, decoded in [
        ("", "", False),
        ("tilde_decode: true\n", "", True),
        ("tilde_decode: true\n", "    tilde_decode: false\n", False),
        ("", "    tilde_decode: true\n", True),
    ]:
        text = (
            f"version: 1\n{default}routes:\n  - name: plain\n    methods: [GET]\n"
            f"    path: /a/{{t}}\n    resource: t:{{t}}\n    action: read\n{flag}"
        )
        match = matched(parse_route_file(text, "routes.yaml"), "GET", "/a/~78")
        assert match is not None
        assert match.resource == ("t:x" if decoded else "t:~78")
    refused = route_error(
        "version: 1\ntilde_decode: 1\nroutes:\n"
        "  - {methods: [GET], path: /, resource: r, action: a}\n"
    )
    assert "tilde_decode must be true or false" in str(refused)


def test_tilde_encoded_bytes_that_are_not_utf8_are_refused(datasette: RouteTable) -> None:
    with pytest.raises(PathRejected, match="not UTF-8") as refused:
        matched(datasette, "GET", "/sales/~FF.json")
    assert refused.value.code == "tilde_encoding"


@settings(max_examples=500)
@given(
    st.text(st.characters(exclude_characters="\x00"), max_size=24)
    | st.from_regex(r"[~+%a-f0-9]{0,16}")
)
def test_tilde_decode_is_datasettes_own(value: str) -> None:
    from datasette.utils import tilde_decode as datasettes

    # A "~" with a literal "%" within two characters after it makes Datasette decode part
    # of the random token it put in the "%"'s place: its name is then random (and no table).
    assume(not any("%" in value[i + 1 : i + 3] for i, c in enumerate(value) if c == "~"))
    theirs = datasettes(value)
    try:
        ours = tilde_decode(value)
    except ValueError:
        # Where the bytes are not UTF-8, Datasette substitutes U+FFFD; the proxy refuses.
        assert "\ufffd" in theirs
    else:
        assert ours == theirs
