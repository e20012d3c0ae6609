"""The deployment files in deploy/ against the product they deploy.

No cluster and no Docker engine run here, so what can be checked is checked without them:
- every Kubernetes object decodes strictly into the Kubernetes API's own Go types
  (tests/k8scheck: an unknown or misplaced field, or a value of the wrong type, fails);
- every lineage-sidecar container's configuration passes `lineage-sidecar CMD --check`,
  run against a copy of what its volume mounts would hold, so each file the configuration
  names is where a mount puts it;
- ports, probes, Services, the NetworkPolicy, the shared spool, writable paths under a
  read-only root, the image tag and user, and the alert rules' metric names agree with
  the configuration and the code;
- the files the Dockerfile copies build the package (a wheel, as its `pip install .`).
What stays unchecked: building and running the image, and applying the manifests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent.metrics import AGENT_METRICS, INGEST_METRICS
from proxy.metrics import ProxyMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
CLI = str(Path(sys.executable).with_name("lineage-sidecar"))
K8SCHECK = REPO / "tests" / "k8scheck"
IMAGE = "lineage-sidecar"
# Placeholder contents for secret volume items (only their presence is checked).
SECRET_ITEMS = {"dsn": "postgresql://lineage:secret@db.example:5432/lineage",
                "token": "s.placeholder-token"}  # fmt: skip
PORT_OF_LISTEN = re.compile(r"^(?P<host>[^:]+|\[[^\]]+\]):(?P<port>\d+)$")

Obj = dict[str, Any]


def objects() -> list[Obj]:
    found: list[Obj] = []
    for path in MANIFESTS:
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def find(kind: str, name: str) -> Obj | None:
    for obj in objects():
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    return None


def workloads() -> list[Obj]:
    return [obj for obj in objects() if obj["kind"] in ("Deployment", "StatefulSet")]


def all_containers(workload: Obj) -> list[Obj]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def ours(workload: Obj) -> Iterator[Obj]:
    for container in all_containers(workload):
        if container["image"].split(":")[0] == IMAGE:
            yield container


def sidecar_containers() -> list[tuple[Obj, Obj]]:
    return [(w, c) for w in workloads() for c in ours(w)]


def container_id(pair: tuple[Obj, Obj]) -> str:
    return f"{pair[0]['metadata']['name']}/{pair[1]['name']}"


def volume(workload: Obj, name: str) -> Obj:
    spec = workload["spec"]
    for item in spec["template"]["spec"].get("volumes", []):
        if item["name"] == name:
            found: Obj = item
            return found
    for claim in spec.get("volumeClaimTemplates", []):
        if claim["metadata"]["name"] == name:
            return {"name": name, "persistentVolumeClaim": claim}
    raise AssertionError(f"{workload['metadata']['name']}: no volume {name!r}")


def mount_of(container: Obj, path: str) -> Obj | None:
    """The volume mount holding `path` (the longest mount path that contains it)."""
    best: Obj | None = None
    for mount in container.get("volumeMounts", []):
        root = PurePosixPath(mount["mountPath"])
        inside = PurePosixPath(path) == root or root in PurePosixPath(path).parents
        if inside and (best is None or len(mount["mountPath"]) > len(best["mountPath"])):
            best = mount
    return best


def config_path(container: Obj) -> str:
    args = container["args"]
    return str(args[args.index("--config") + 1])


def config_text(workload: Obj, container: Obj) -> str:
    path = config_path(container)
    mount = mount_of(container, path)
    assert mount is not None, f"{container['name']}: {path} is on no volume"
    source = volume(workload, mount["name"])
    assert "configMap" in source, f"{container['name']}: {path} is not on a ConfigMap volume"
    config_map = find("ConfigMap", source["configMap"]["name"])
    assert config_map is not None, f"ConfigMap {source['configMap']['name']} not in deploy/"
    key = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    assert key in config_map["data"], f"ConfigMap has no {key}"
    return str(config_map["data"][key])


def config_of(workload: Obj, container: Obj) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(config_text(workload, container))
    return loaded


def port(listen: str) -> tuple[str, int]:
    match = PORT_OF_LISTEN.match(listen)
    assert match is not None, listen
    return match["host"], int(match["port"])


def named_ports(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


# --- strict decoding into the Kubernetes API's types ---------------------------------------


@pytest.fixture(scope="session")
def k8scheck() -> Path:
    """tests/k8scheck built once per source version (Go and modules from the module proxy)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("no `go` on PATH: tests/k8scheck is built with Go", pytrace=False)
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((K8SCHECK / name).read_bytes())
    binary = REPO / "var" / "cache" / "k8scheck" / f"k8scheck-{digest.hexdigest()[:16]}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(
            [go, "build", "-o", str(binary), "."],
            cwd=K8SCHECK,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert built.returncode == 0, f"building tests/k8scheck failed:\n{built.stderr[-3000:]}"
    return binary


def test_every_manifest_decodes_strictly_as_kubernetes_objects(k8scheck: Path) -> None:
    assert MANIFESTS, "no manifests in deploy/kubernetes"
    result = subprocess.run(
        [str(k8scheck), *map(str, MANIFESTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    checked = result.stdout.count("\nok ") + result.stdout.startswith("ok ")
    assert checked == len(objects())


def test_the_checker_refuses_a_misspelled_field(k8scheck: Path, tmp_path: Path) -> None:
    # The check above can fail: a field Kubernetes does not know is an error.
    text = (DEPLOY / "kubernetes" / "sidecar.yaml").read_text()
    assert "readinessProbe:" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("readinessProbe:", "readinesProbe:", 1))
    result = subprocess.run([str(k8scheck), str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert 'unknown field "readinesProbe"' in result.stderr


# --- each container's configuration against its mounts --------------------------------------


def populate(workload: Obj, container: Obj, root: Path) -> None:
    """Under `root`, what the container's volume mounts would hold."""
    for mount in container.get("volumeMounts", []):
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        source = volume(workload, mount["name"])
        if "configMap" in source:
            name = source["configMap"]["name"]
            config_map = find("ConfigMap", name)
            if config_map is not None:
                for key, value in config_map.get("data", {}).items():
                    (target / key).write_text(value)
            elif name.endswith("-policies"):
                # Made from the repository's policies/ (deploy/README.md).
                for policy_file in (REPO / "policies").iterdir():
                    shutil.copy(policy_file, target / policy_file.name)
            else:
                raise AssertionError(f"{container['name']}: ConfigMap {name} is not described")
        elif "secret" in source:
            items = source["secret"].get("items")
            if items:
                for item in items:
                    (target / item["path"]).write_text(SECRET_ITEMS[item["key"]])
            else:  # a kubernetes.io/tls Secret
                (target / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\n")
                (target / "tls.key").write_text("-----BEGIN PRIVATE KEY-----\n")


def rooted(text: str, container: Obj, root: Path) -> str:
    """The configuration with every mounted path moved under `root`."""
    mounts = sorted((m["mountPath"] for m in container.get("volumeMounts", [])), key=len)
    # One pass, longest first, so a moved path is never moved again.
    pattern = "|".join(re.escape(m) for m in reversed(mounts))
    return re.sub(rf"(?<![\w/])(?:{pattern})(?=/|\b)", lambda m: str(root) + m[0], text)


@pytest.mark.parametrize("pair", sidecar_containers(), ids=container_id)
def test_each_configuration_passes_check_against_what_its_mounts_hold(
    pair: tuple[Obj, Obj], tmp_path: Path
) -> None:
    workload, container = pair
    root = tmp_path / "root"
    populate(workload, container, root)
    config = root / config_path(container).lstrip("/")
    config.write_text(rooted(config_text(workload, container), container, root))
    args = [a if a != config_path(container) else str(config) for a in container["args"]]
    # Secrets come from files only: nothing from this environment may fill them in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LS_", "LINEAGE_SIDECAR_"))}
    result = subprocess.run(
        [CLI, *args, "--check"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config}: ok"


# --- what the manifests and the configuration must agree on ---------------------------------


@pytest.mark.parametrize("pair", sidecar_containers(), ids=container_id)
def test_ports_and_probes_are_the_listeners_of_the_configuration(pair: tuple[Obj, Obj]) -> None:
    workload, container = pair
    command, config = container["args"][0], config_of(workload, container)
    ports = named_ports(container)
    if command in ("proxy", "api"):
        expected = {"https": config["proxy"]["listen"], "admin": config["admin"]["listen"]}
    elif command == "agent":
        expected = {"agent-admin": config["agent"]["admin_listen"]}
    else:
        expected = {"admin": config["ingest"]["admin_listen"]}
    assert set(ports) == set(expected)
    for name, listen in expected.items():
        host, number = port(listen)
        # The kubelet's probes and the Service come from outside the pod's loopback.
        assert host == "0.0.0.0", f"{name} listens on {listen}"
        assert ports[name] == number
    admin = "agent-admin" if command == "agent" else "admin"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": admin}
    if command == "agent":
        # A native sidecar's readiness is part of its pod's: an agent whose sink fails
        # (its /readyz is 503) must not take the data service out of its Service.
        assert "readinessProbe" not in container
    else:
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": admin}


def test_services_and_network_policies_name_ports_that_exist() -> None:
    for obj in objects():
        if obj["kind"] not in ("Service", "NetworkPolicy"):
            continue
        selector = (
            obj["spec"]["selector"]
            if obj["kind"] == "Service"
            else obj["spec"]["podSelector"]["matchLabels"]
        )
        [workload] = [
            w for w in workloads()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        ports: dict[str, int] = {}
        for container in all_containers(workload):
            ports.update(named_ports(container))
        if obj["kind"] == "Service":
            # Only the proxy is exposed: never an admin listener or the data service.
            assert [p["targetPort"] for p in obj["spec"]["ports"]] == ["https"]
        else:
            allowed = {p["port"] for rule in obj["spec"]["ingress"] for p in rule["ports"]}
            assert allowed == set(ports.values())


def test_the_data_service_is_reached_only_through_the_proxy() -> None:
    for workload in workloads():
        others = [c for c in all_containers(workload) if c["image"].split(":")[0] != IMAGE]
        for proxy in [c for c in ours(workload) if c["args"][0] == "proxy"]:
            upstream = config_of(workload, proxy)["proxy"]["upstream"]
            match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", upstream)
            assert match is not None, upstream
            [service] = others
            args = service["args"]
            assert args[args.index("--host") + 1] == "127.0.0.1"
            assert args[args.index("--port") + 1] == match[1]


def test_the_proxy_and_the_agent_share_one_durable_spool() -> None:
    [sidecar] = [w for w in workloads() if w["kind"] == "StatefulSet"]
    by_command = {c["args"][0]: c for c in ours(sidecar)}
    proxy, agent = by_command["proxy"], by_command["agent"]
    config = config_of(sidecar, proxy)
    spool = config["capture"]["spool_dir"]
    assert config_of(sidecar, agent)["agent"]["spool_dir"] == spool
    proxy_mount, agent_mount = mount_of(proxy, spool), mount_of(agent, spool)
    assert proxy_mount is not None
    assert agent_mount is not None
    assert proxy_mount["name"] == agent_mount["name"]
    assert proxy_mount["mountPath"] == agent_mount["mountPath"]
    # A volume that outlives the pod: records not yet shipped are not lost with it.
    assert "persistentVolumeClaim" in volume(sidecar, proxy_mount["name"])
    # The agent starts before the proxy and stops after it (a native sidecar).
    init = sidecar["spec"]["template"]["spec"]["initContainers"]
    assert [(c["name"], c.get("restartPolicy")) for c in init] == [(agent["name"], "Always")]


@pytest.mark.parametrize("pair", sidecar_containers(), ids=container_id)
def test_what_each_process_writes_is_on_a_writable_volume(pair: tuple[Obj, Obj]) -> None:
    workload, container = pair
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    config = config_of(workload, container)
    written = ["/tmp"]
    if "capture" in config and container["args"][0] in ("proxy", "api"):
        written.append(config["capture"]["spool_dir"])
    if container["args"][0] in ("proxy", "api"):
        written.append(config["policy"]["audit_log"])
    if container["args"][0] == "agent":
        written.append(config["agent"]["spool_dir"])
    for path in written:
        mount = mount_of(container, path)
        assert mount is not None, f"{container['name']} writes {path} on its read-only root"
        assert not mount.get("readOnly", False), path
        source = volume(workload, mount["name"])
        assert {"emptyDir", "persistentVolumeClaim"} & source.keys(), path


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_images_users_and_exposed_ports_match_the_dockerfile() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    uid = int(re.search(r"^USER (\d+)$", dockerfile(), re.MULTILINE)[1])  # type: ignore[index]
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile(), re.MULTILINE)[1].split()}  # type: ignore[index]
    for workload, container in sidecar_containers():
        assert container["image"] == f"{IMAGE}:{version}"
        context = workload["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsUser"] == uid
        assert context["runAsNonRoot"] is True
        assert set(named_ports(container).values()) <= exposed


def test_the_dockerfile_copies_every_package_and_the_ignore_file_lets_them_through() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {
        source.rstrip("/")
        for line in dockerfile().splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    }
    assert packages <= copied
    for source in copied:
        assert (REPO / source).exists(), source
    allowed = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed


def test_the_files_the_dockerfile_copies_build_the_package(tmp_path: Path) -> None:
    # What `pip install .` in the image's build stage has: exactly the copied files.
    source = tmp_path / "src"
    source.mkdir()
    for line in dockerfile().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *names, _ = line.split()[1:]
            for name in names:
                path = REPO / name.rstrip("/")
                if path.is_dir():
                    shutil.copytree(
                        path, source / path.name, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy(path, source / path.name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = tmp_path.glob("lineage_sidecar-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        [entry_points] = [n for n in members if n.endswith("entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert "agent/store/migrations/001_init.sql" in members
    assert "lineage_sidecar/cli.py" in members
    assert "lineage-sidecar = lineage_sidecar.cli:main" in scripts


# --- monitoring ---------------------------------------------------------------------------


def exposed_metric_names() -> set[str]:
    registry = CollectorRegistry(auto_describe=True)
    ProxyMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names.update(sample.name for sample in family.samples)
    for table in (AGENT_METRICS, INGEST_METRICS):
        names.update(table.name(spec) for spec in table.specs)
    return names


def test_alert_rules_use_metrics_the_product_exposes() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    exposed = exposed_metric_names()
    seen: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "labels", "annotations"} | (
                {"for"} if "for" in rule else set()
            )
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
            used = set(re.findall(r"\blineage_[a-z_]+\b", rule["expr"]))
            assert used, rule["alert"]
            assert used <= exposed, (rule["alert"], used - exposed)
            seen |= used
    # The gauges an operator must act on are all alerted on.
    assert {
        "lineage_agent_spools_stopped",
        "lineage_sidecar_spool_full",
        "lineage_sidecar_policy_reload_failing",
    } <= seen


def test_the_scrape_job_keeps_every_admin_port_of_the_manifests() -> None:
    [job] = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yaml").read_text())
    [keep] = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    pattern = re.compile(f"^(?:{keep['regex']})$")
    for _, container in sidecar_containers():
        for name, number in named_ports(container).items():
            admin = number in (9901, 9902, 9903)
            assert bool(pattern.match(name)) == admin, name
