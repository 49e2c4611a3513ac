"""deploy/k8s and the Dockerfile: every overlay renders with `kubectl kustomize`, every object it
renders validates against the schemas of the Kubernetes versions the README names, and the
objects agree with the gateway they run: its ports, its probes' paths, its configuration file
(rendered with the Secrets' values as the init container renders it), its token variables, its
draining, its admin listener kept internal.

`kubectl` is required (CI's machine has it): without it these tests fail, they do not skip."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml

from gateway.config import GatewayConfig
from tests.support import ROOT, procs
from tests.support.deploy import DEPLOY

K8S = DEPLOY / "k8s"
OVERLAYS = ("single", "replicated")
# The Kubernetes versions the README's "Deploying on Kubernetes" names; kubernetes-validate
# (pinned in pyproject.toml's dev extra) ships their schemas.
KUBERNETES_VERSIONS = ("1.35", "1.36", "1.37")
POD_LABELS = {"app.kubernetes.io/name": "tokengate", "app.kubernetes.io/component": "gateway"}
# Secrets the overlays use but do not create, which the README tells operators to create.
EXTERNAL_SECRETS = {
    "single": {"vllm-worker-api-key"},
    "replicated": {"vllm-worker-api-key", "tokengate-postgres", "tokengate-redis"},
}
# A value for each variable the init container puts into gateway.toml, hostile where TOML
# strings are concerned: quotes, backslashes, a newline, non-ASCII, a dollar sign, DEL.
SECRET_VALUES = {
    "VLLM_API_KEY": 'k"e\\y\n$é\x7f+/=',
    "TOKENGATE_REDIS_URL": "redis://:p%40ss%2Fword@redis.tokengate.svc.cluster.local:6379/0",
}

Obj = dict[str, Any]


def kustomize(directory: Path) -> tuple[Obj, ...]:
    """The objects `kubectl kustomize DIRECTORY` renders."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required to render deploy/k8s (CI's machine image has it)"
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    return kustomize(K8S / "overlays" / overlay)


def named(obj: Obj, name: str) -> bool:
    """Whether `obj` is `name`, or kustomize's `name-<hash>` of a generated object."""
    pattern = rf"{re.escape(name)}(-[a-z0-9]{{10}})?"
    return re.fullmatch(pattern, obj["metadata"]["name"]) is not None


def one(objects: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or named(o, name))]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_spec(objects: tuple[Obj, ...]) -> Obj:
    spec: Obj = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(objects: tuple[Obj, ...], name: str) -> Obj:
    spec = pod_spec(objects)
    containers: list[Obj] = spec["containers"] + spec.get("initContainers", [])
    (found,) = [c for c in containers if c["name"] == name]
    return found


def config_map_file(objects: tuple[Obj, ...], name: str, file: str) -> str:
    """A file of the ConfigMap the pod's projected volume `config-template` mounts."""
    volume = volume_named(objects, "config-template")
    names = [s["configMap"]["name"] for s in volume["projected"]["sources"]]
    for config_map in objects:
        if config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] in names:
            data: dict[str, str] = config_map["data"]
            if file in data:
                assert named(config_map, name)
                return data[file]
    raise AssertionError(f"no ConfigMap mounted in the pod has {file}")


def volume_named(objects: tuple[Obj, ...], name: str) -> Obj:
    volumes: list[Obj] = pod_spec(objects)["volumes"]
    (found,) = [v for v in volumes if v["name"] == name]
    return found


def mount_of(c: Obj, path: str) -> Obj:
    """The volume mount of container `c` that holds `path`."""
    mounts = [m for m in c["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of {c['name']}: the root filesystem is read-only"
    found: Obj = max(mounts, key=lambda m: len(m["mountPath"]))
    return found


def env_value(c: Obj, name: str) -> Obj:
    env: list[Obj] = c.get("env", [])
    (found,) = [e for e in env if e["name"] == name]
    return found


def rendered_toml(objects: tuple[Obj, ...], tmp_path: Path) -> str:
    """gateway.toml as the init container writes it: its own script, from the ConfigMap, run
    on the ConfigMap's template with the environment the init container declares."""
    init = container(objects, "render-config")
    script = tmp_path / "render-config.py"
    script.write_text(config_map_file(objects, "tokengate-render-config", "render-config.py"))
    template = tmp_path / "template.toml"
    template.write_text(config_map_file(objects, "tokengate-config", "gateway.toml"))
    target = tmp_path / "gateway.toml"
    env = {"PATH": os.environ["PATH"]}
    env.update({e["name"]: SECRET_VALUES[e["name"]] for e in init["env"]})
    done = subprocess.run(
        [sys.executable, str(script), str(template), str(target)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert target.stat().st_mode & 0o077 == 0, "the rendered file holds secrets: owner-only"
    return target.read_text()


def loaded(objects: tuple[Obj, ...], tmp_path: Path) -> tuple[dict[str, Any], GatewayConfig]:
    """The rendered gateway.toml, as TOML and as the gateway validates it."""
    data = tomllib.loads(rendered_toml(objects, tmp_path))
    return data, validated(data)


def validated(data: dict[str, Any]) -> GatewayConfig:
    """The gateway's own validation of the whole file."""
    return GatewayConfig.model_validate(data)


# --- every overlay renders and validates ----------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay: str, version: str) -> None:
    objects = render(overlay)
    for obj in objects:
        # strict: a field the version does not know (a typo, a misplaced key) fails too.
        assert kubernetes_validate.validate(obj, version, strict=True) == version


def test_kubernetes_validate_has_the_schemas_of_the_named_versions() -> None:
    # validate() falls back to an older version's schemas for a version it lacks: refuse that.
    shipped = {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= shipped


def test_readme_names_the_validated_versions() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying on Kubernetes") :]
    section = section[: section.index("\n## ", 1)]
    assert ", ".join(KUBERNETES_VERSIONS[:-1]) + f" and {KUBERNETES_VERSIONS[-1]}" in section
    for secret in set().union(*EXTERNAL_SECRETS.values()):
        assert secret in section, f"the README does not say to create the Secret {secret}"


@pytest.mark.parametrize(
    ("overlay", "kinds"),
    [
        (
            "single",
            {
                "ConfigMap": 2,
                "Secret": 1,
                "Service": 2,
                "PersistentVolumeClaim": 1,
                "Deployment": 1,
                "PodDisruptionBudget": 1,
                "NetworkPolicy": 1,
            },
        ),
        (
            "replicated",
            {
                "ConfigMap": 2,
                "Secret": 1,
                "Service": 2,
                "Deployment": 1,
                "PodDisruptionBudget": 1,
                "HorizontalPodAutoscaler": 1,
                "NetworkPolicy": 1,
            },
        ),
    ],
)
def test_each_overlay_renders_its_objects_in_one_namespace(
    overlay: str, kinds: dict[str, int]
) -> None:
    objects = render(overlay)
    counted: dict[str, int] = {}
    for obj in objects:
        counted[obj["kind"]] = counted.get(obj["kind"], 0) + 1
        assert obj["metadata"]["namespace"] == "tokengate"
    assert counted == kinds


# --- the objects agree with the gateway -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_ports_are_the_configured_listeners(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    _, config = loaded(objects, tmp_path)
    gateway = container(objects, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {
        "http": config.server.port,
        "grpc": config.grpc.port,
        "admin": config.admin.port,
    }
    # Listening on the pod's address, not loopback: Services and probes come from outside.
    assert config.server.host == config.grpc.host == config.admin.host == "0.0.0.0"
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.server.port)

    public = one(objects, "Service", "tokengate")
    admin = one(objects, "Service", "tokengate-admin")
    assert {p["targetPort"] for p in public["spec"]["ports"]} == {"http", "grpc"}
    assert {p["targetPort"] for p in admin["spec"]["ports"]} == {"admin"}
    for service in (public, admin):
        assert service["spec"]["selector"] == POD_LABELS
        for port in service["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_gateways_routes_and_draining_fits_the_grace_period(
    overlay: str, tmp_path: Path
) -> None:
    objects = render(overlay)
    _, config = loaded(objects, tmp_path)
    gateway = container(objects, "gateway")
    readiness, liveness = gateway["readinessProbe"], gateway["livenessProbe"]
    # /ready turns 503 on SIGTERM; /metrics answers 200 whether or not a worker is healthy
    # (test_the_liveness_probe_passes_while_no_worker_is_healthy, below, on a running gateway).
    assert readiness["httpGet"] == {"path": "/ready", "port": "http"}
    assert liveness["httpGet"] == {"path": "/metrics", "port": "http"}

    drain = config.server.drain_seconds
    # The readiness probe sees the 503 while the listener still serves...
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < drain
    # ...and Kubernetes kills the pod only after draining and the grace have run out.
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert drain + config.server.shutdown_grace_seconds + 10 <= grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_file_is_where_the_gateway_and_the_image_read_it(
    overlay: str, tmp_path: Path
) -> None:
    objects = render(overlay)
    gateway, init = container(objects, "gateway"), container(objects, "render-config")
    command = gateway["command"]
    assert command[:2] == ["gateway", "serve"]
    path = command[command.index("--config") + 1]
    assert command == dockerfile_entrypoint()
    # The init container writes the file on the volume the gateway reads it from.
    assert init["command"][-1] == path
    assert mount_of(init, path)["name"] == mount_of(gateway, path)["name"] == "config"
    assert volume_named(objects, "config")["emptyDir"]["medium"] == "Memory"
    template_mount = mount_of(init, init["command"][-2])
    assert init["command"][1] == f"{template_mount['mountPath']}/render-config.py"
    assert template_mount["name"] == "config-template"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_reach_the_variables_the_gateway_reads(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    _, config = loaded(objects, tmp_path)
    gateway, init = container(objects, "gateway"), container(objects, "render-config")
    generated = {o["metadata"]["name"]: set(o["data"]) for o in objects if o["kind"] == "Secret"}
    tokens = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in gateway["env"]
        if named({"metadata": e["valueFrom"]["secretKeyRef"]}, "tokengate-tokens")
    }
    assert set(tokens) == {config.admin.token_env, config.admin.billing_token_env}
    for ref in tokens.values():
        assert ref["key"] in generated[ref["name"]]

    # Every placeholder of gateway.toml has a variable in the init container, and no more.
    template = config_map_file(objects, "tokengate-config", "gateway.toml")
    placeholders = set(re.findall(r"\$\{(\w+)\}", template))
    assert placeholders == {e["name"] for e in init["env"]}

    # Secrets not generated here exist before the overlay is applied (the README says so).
    external = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in (gateway, init)
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    } - set(generated)
    assert external == EXTERNAL_SECRETS[overlay]
    # The workers' key is the Secret the vLLM workers read theirs from.
    worker = worker_statefulset()["spec"]["template"]["spec"]["containers"][0]
    vllm_key = env_value(worker, "VLLM_API_KEY")["valueFrom"]["secretKeyRef"]
    assert env_value(init, "VLLM_API_KEY")["valueFrom"]["secretKeyRef"] == vllm_key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_the_vllm_statefulsets_headless_service(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    _, config = loaded(objects, tmp_path)
    ((worker),) = config.workers
    assert worker.dns is not None
    url = urlsplit(worker.dns)
    service = one(worker_manifest(), "Service")
    assert service["spec"]["clusterIP"] == "None", "one address per pod needs a headless Service"
    namespace = one(objects, "Deployment")["metadata"]["namespace"]
    assert url.hostname == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert url.port == service["spec"]["ports"][0]["port"]
    assert worker.api_key == SECRET_VALUES["VLLM_API_KEY"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_admin_port_is_reachable_only_from_labelled_pods(overlay: str) -> None:
    objects = render(overlay)
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == POD_LABELS
    assert policy["policyTypes"] == ["Ingress"]
    ports = {p["name"] for p in container(objects, "gateway")["ports"]}
    opened: set[str] = set()
    for rule in policy["ingress"]:
        # A rule without ports would open every port, the admin port included.
        rule_ports = {p["port"] for p in rule["ports"]}
        assert rule_ports <= ports
        if "admin" in rule_ports:
            assert rule_ports == {"admin"}
            (peer,) = rule["from"]
            label = {"tokengate.io/admin-client": "true"}
            assert peer["podSelector"]["matchLabels"] == label
            assert peer["namespaceSelector"]["matchLabels"] == label
        else:
            assert "from" not in rule
        opened |= rule_ports
    assert opened == ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_and_autoscaler_select_the_gateways_pods(overlay: str) -> None:
    objects = render(overlay)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert POD_LABELS.items() <= labels.items()
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1
    spread = pod_spec(objects).get("topologySpreadConstraints", [])
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        # Utilization is a share of the request: without one the autoscaler cannot act.
        assert container(objects, "gateway")["resources"]["requests"]["cpu"]
    # The autoscaler owns the replica count where there is one; a fixed count otherwise.
    assert ("replicas" in deployment["spec"]) == (not hpas)


def test_single_keeps_one_process_on_a_persistent_sqlite_ledger(tmp_path: Path) -> None:
    objects = render("single")
    _, config = loaded(objects, tmp_path)
    deployment = one(objects, "Deployment")["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}
    assert config.storage.url.startswith("sqlite:////")
    assert config.quota.redis_url is None
    gateway = container(objects, "gateway")
    db = config.storage.url.removeprefix("sqlite:///")
    journal = config.journal_dir()
    assert journal is not None
    for path in (db, journal):
        volume = volume_named(objects, mount_of(gateway, path)["name"])
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == [
            "ReadWriteOnce"
        ]


def test_replicated_shares_postgresql_and_redis_and_fails_closed(tmp_path: Path) -> None:
    objects = render("replicated")
    _, config = loaded(objects, tmp_path)
    storage = urlsplit(config.storage.url)
    assert storage.scheme == "postgresql"
    assert storage.password is None, "the ledger's password comes from PGPASSWORD"
    gateway = container(objects, "gateway")
    assert env_value(gateway, "PGPASSWORD")["valueFrom"]["secretKeyRef"] == {
        "name": "tokengate-postgres",
        "key": "password",
    }
    assert config.quota.redis_url == SECRET_VALUES["TOKENGATE_REDIS_URL"]
    # Each replica's fallback share is a share of the most replicas there can be.
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert config.quota.replicas == hpa["maxReplicas"]
    assert config.quota.budgets_when_redis_down == "reject"
    journal = config.journal_dir()
    assert journal is not None
    assert mount_of(gateway, journal)["name"] == "data"
    assert "emptyDir" in volume_named(objects, "data")
    strategy = one(objects, "Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_on_a_read_only_root(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    spec = pod_spec(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_user() != 0
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        context = c["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
    # What the gateway writes is on a volume.
    _, config = loaded(objects, tmp_path)
    journal = config.journal_dir()
    assert journal is not None
    mount_of(container(objects, "gateway"), journal)
    mount_of(container(objects, "gateway"), "/tmp/x")


# --- the init container's rendering ---------------------------------------------------------


def run_render(tmp_path: Path, template: str, **env: str) -> subprocess.CompletedProcess[str]:
    source, target = tmp_path / "in.toml", tmp_path / "out.toml"
    source.write_text(template)
    return subprocess.run(
        [sys.executable, str(K8S / "base" / "render-config.py"), str(source), str(target)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize(
    "value", ['"', "\\", "a\nb", "tab\there", "$HOME", "${X}", "é€😀", "\x01\x1f\x7f", "''' \"\"\""]
)
def test_render_keeps_any_secret_one_toml_string(tmp_path: Path, value: str) -> None:
    done = run_render(tmp_path, 'a = "${SECRET}"\nb = "x-${SECRET}-y" # $$ stays\n', SECRET=value)
    assert done.returncode == 0, done.stderr
    assert tomllib.loads((tmp_path / "out.toml").read_text()) == {
        "a": value,
        "b": f"x-{value}-y",
    }


def test_render_refuses_a_template_whose_variable_is_not_set(tmp_path: Path) -> None:
    done = run_render(tmp_path, 'a = "${MISSING_SECRET}"\n')
    assert done.returncode == 1
    assert "MISSING_SECRET is not set" in done.stderr
    assert not (tmp_path / "out.toml").exists()


def test_render_refuses_a_stray_dollar(tmp_path: Path) -> None:
    done = run_render(tmp_path, 'a = "${}"\n')
    assert done.returncode == 1
    assert "Invalid placeholder" in done.stderr


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def dockerfile_entrypoint() -> list[str]:
    (entrypoint,) = [args for word, args in dockerfile() if word == "ENTRYPOINT"]
    parsed: list[str] = json.loads(entrypoint)
    return parsed


def dockerfile_user() -> int:
    (user,) = [args for word, args in dockerfile() if word == "USER"]
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it.
    assert uid.isdigit(), user
    assert gid.isdigit(), user
    return int(uid)


def test_dockerfile_builds_the_wheel_and_runs_it_unprivileged() -> None:
    instructions = dockerfile()
    stages = [args.split() for word, args in instructions if word == "FROM"]
    assert [stage[-1] for stage in stages] == ["builder", "runtime"]
    builder, runtime = stages[0][0], stages[1][0]
    toolchain = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    assert builder.startswith(f"rust:{toolchain}-")
    assert runtime.startswith("python:3.11-")
    runs = " ".join(args for word, args in instructions if word == "RUN")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "maturin==1.16.0" in project["project"]["optional-dependencies"]["dev"]
    assert "maturin==1.16.0" in runs
    assert "maturin build --release --out /wheels" in runs
    assert any(w == "COPY" and a.startswith("--from=builder /wheels ") for w, a in instructions)
    # Everything after USER runs as that user, the entrypoint included.
    words = [word for word, _ in instructions]
    assert words.index("USER") > words.index("FROM", 1)
    assert dockerfile_user() != 0
    assert dockerfile_entrypoint()[:2] == ["gateway", "serve"]
    # The image exposes the listeners of the configuration it is deployed with.
    (exposed,) = [args.split() for word, args in instructions if word == "EXPOSE"]
    base = tomllib.loads((K8S / "base" / "gateway.toml").read_text())
    assert [int(p) for p in exposed] == [
        base["server"]["port"],
        base["grpc"]["port"],
        base["admin"]["port"],
    ]


# --- the vLLM workers' manifest ---------------------------------------------------------------


def worker_manifest() -> tuple[Obj, ...]:
    text = (DEPLOY / "vllm" / "k8s" / "worker.yaml").read_text()
    return tuple(doc for doc in yaml.safe_load_all(text) if doc)


def worker_statefulset() -> Obj:
    return one(worker_manifest(), "StatefulSet")


# --- on a running gateway and a real PostgreSQL ----------------------------------------------


@pytest.mark.e2e
def test_the_liveness_probe_passes_while_no_worker_is_healthy(tmp_path: Path) -> None:
    """The workers' pods are down or still loading their model: /health is 503, and a liveness
    probe on it would restart the gateway for the workers' sake; the deployed one answers 200."""
    probe = container(render("single"), "gateway")["livenessProbe"]["httpGet"]["path"]
    nobody = f"http://127.0.0.1:{procs.free_port()}"  # nothing listens there
    config = procs.write_config(tmp_path / "gateway.toml", [nobody], tmp_path / "ledger.db")
    gateway = procs.start(["serve", "--config", str(config)])
    try:
        assert procs.wait_for(
            lambda: httpx.get(f"{gateway.url}/health", timeout=5).status_code == 503
        )
        assert httpx.get(f"{gateway.url}{probe}", timeout=5).status_code == 200
    finally:
        gateway.stop()


@pytest.mark.e2e
def test_the_ledger_password_reaches_libpq_from_pgpassword(pg_url: str, tmp_path: Path) -> None:
    """overlays/replicated's ledger URL has no password: the pod's PGPASSWORD supplies it."""
    parts = urlsplit(pg_url)
    assert parts.password
    bare = pg_url.replace(f":{parts.password}@", "@", 1)
    assert urlsplit(bare).password is None

    def tenants(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "tenants", "list", "--db", bare],
            env={k: v for k, v in os.environ.items() if k != "PGPASSWORD"} | env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    refused = tenants()
    assert refused.returncode != 0
    assert "password" in refused.stdout + refused.stderr
    done = tenants(PGPASSWORD=parts.password)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readmes_own_overlay_sets_the_image_and_the_tokens(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```yaml\n# my-overlay/kustomization.yaml\n(.*?)```", readme, re.S)
    mine = tmp_path / "my-overlay"
    mine.mkdir()
    overlay = os.path.relpath(K8S / "overlays" / "replicated", mine)
    (mine / "kustomization.yaml").write_text(
        example.replace("../deploy/k8s/overlays/replicated", overlay)
    )
    (mine / "admin-token.txt").write_text("admin-secret")
    (mine / "billing-token.txt").write_text("billing-secret")
    objects = kustomize(mine)
    secret = one(objects, "Secret", "tokengate-tokens")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {"admin-token": "admin-secret", "billing-token": "billing-secret"}
    gateway = container(objects, "gateway")
    assert (
        env_value(gateway, "TOKENGATE_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]["name"]
        == (secret["metadata"]["name"])
    )
    for c in (gateway, container(objects, "render-config")):
        assert c["image"] == "registry.example.com/tokengate:0.1.0"
