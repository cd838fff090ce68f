"""Static checks of deploy/ (no Docker engine here): the files parse, and agree with Flower and with the kits.

* Dockerfiles: every COPY source exists in the build context; every flag of ENTRYPOINT/CMD is
  one the process tests pass through the kit scripts or one the command's ``--help`` lists;
  Flower's quiet/no-install variables are set; versions are pinned; the user is not root.
* compose.yaml and k8s/: load with ``yaml.safe_load``; every mounted kit path and every secret
  key is a file ``fedsynth provision`` creates; probes point at the health port the image opens.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server import kits
from server.provision import ProvisionRequest, provision

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILES = {"server": DEPLOY / "server.Dockerfile", "hospital": DEPLOY / "hospital.Dockerfile"}
COMMANDS = {"server": "flower-superlink", "hospital": "flower-supernode"}
COMPOSE_SITES = ("hospital-a", "hospital-b", "hospital-c")


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def exec_form(path: Path, instruction: str) -> list[str]:
    found = [args for keyword, args in parse_dockerfile(path) if keyword == instruction]
    assert found, f"{path}: no {instruction}"
    value = json.loads(found[-1])  # only the last one counts
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{path}: {instruction} must be exec form"
    return value


def flags(tokens: list[str]) -> set[str]:
    return {t.split("=", 1)[0] for t in tokens if t.startswith("--")}


@functools.lru_cache(maxsize=None)
def help_flags(command: str) -> frozenset[str]:
    exe = Path(sys.executable).parent / command
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", proc.stdout))


@functools.lru_cache(maxsize=None)
def kit_script_flags(name: str) -> frozenset[str]:
    """Flags the kit scripts pass: the process tests start the federation with these scripts."""
    settings = kits.KitSettings(superlink="localhost:9093", port=9093, epsilon=8.0, delta=1e-5)
    script = kits.render_start_superlink(settings) if name == "server" else kits.render_start_supernode(settings)
    exec_line = script[script.index("exec "):]
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", exec_line))


# flags the process tests add to the kit scripts' command lines
PASSED_BY_TESTS = {"server": {"--health-server-address"}, "hospital": {"--port", "--health-server-address"}}


@pytest.fixture(scope="module")
def kits_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FEDSYNTH_HOME as docs/deployment.md and compose.yaml describe it."""
    home = tmp_path_factory.mktemp("fedsynth-home")
    provision(ProvisionRequest(out=home / "kits", sites=COMPOSE_SITES, server_host="server"))
    return home


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_only_what_exists(name: str) -> None:
    copies = [args for keyword, args in parse_dockerfile(DOCKERFILES[name]) if keyword in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not args.startswith("--from"), "multi-stage COPY would need its own check"
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"{DOCKERFILES[name].name}: COPY source {source} is not in the repository"
    ignore = (DEPLOY / f"{DOCKERFILES[name].name}.dockerignore").read_text().splitlines()
    for args in copies:  # what is copied must not be excluded by the Dockerfile's own ignore file
        for source in [p for p in shlex.split(args) if not p.startswith("--")][:-1]:
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the build context"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_entrypoint_flags_are_real_and_exercised(name: str) -> None:
    path = DOCKERFILES[name]
    command = exec_form(path, "ENTRYPOINT")
    tokens = command + (exec_form(path, "CMD") if name == "hospital" else [])
    assert command[0] == COMMANDS[name]
    used = flags(tokens)
    unknown = used - help_flags(COMMANDS[name])
    assert not unknown, f"{path.name}: {COMMANDS[name]} --help does not list {sorted(unknown)}"
    untested = used - kit_script_flags(name) - PASSED_BY_TESTS[name]
    assert not untested, f"{path.name}: {sorted(untested)} never ran in tests/deploy/test_federation_tls.py"
    kit_files = kits.SERVER_KIT_FILES if name == "server" else kits.SITE_KIT_FILES
    for token in tokens:
        for kit_path in re.findall(rf"{kits.CONTAINER_KIT}/([\w.-]+)", token):
            assert kit_path in kit_files, f"{path.name}: {kit_path} is not a file of the {name} kit"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_is_quiet_pinned_and_not_root(name: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[name])
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    for setting in kits.FLOWER_QUIET_ENV:
        assert setting in env, f"{DOCKERFILES[name].name}: ENV lacks {setting}"
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs
    assert re.search(r'"flwr\[simulation\]==1\.42\.\d+"', runs)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert health and "/opt/fedsynth/deploy/healthcheck.py" in health[-1]
    health_port = health[-1].rsplit(":", 1)[1].strip('"]')
    entry = exec_form(DOCKERFILES[name], "ENTRYPOINT")
    assert entry[entry.index("--health-server-address") + 1].endswith(f":{health_port}")


def _substitute(text: str, home: Path) -> str:
    """Compose's ${VAR:?message} and ${VAR:-default}, with FEDSYNTH_HOME set and the rest defaulted."""
    def one(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name == "FEDSYNTH_HOME":
            return str(home)
        assert op == ":-", f"compose.yaml: ${{{name}}} has no default"
        return rest
    return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", one, text)


def test_compose_mounts_the_provisioned_kits(kits_home: Path) -> None:
    compose = yaml.safe_load(_substitute((DEPLOY / "compose.yaml").read_text(), kits_home))
    services = compose["services"]
    assert set(services) == {"server", *COMPOSE_SITES}
    for name, service in services.items():
        image = "server" if name == "server" else "hospital"
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES[image]
        mounts = [v.split(":") for v in service["volumes"]]
        kit_mounts = [m for m in mounts if m[1] == kits.CONTAINER_KIT]
        assert len(kit_mounts) == 1 and kit_mounts[0][2:] == ["ro"], f"{name}: the kit must be mounted read-only"
        source = Path(kit_mounts[0][0])
        expected = kits_home / "kits" / ("server" if name == "server" else f"sites/{name}")
        assert source == expected and source.is_dir(), f"{name}: {source} is not a kit provision creates"
        wanted = kits.SERVER_KIT_FILES if name == "server" else kits.SITE_KIT_FILES
        assert all((source / f).is_file() for f in wanted)
        if name != "server":
            assert [kits.CONTAINER_SCANS, "ro"] in [m[1:] for m in mounts], f"{name}: scans must be read-only"
            assert [kits.CONTAINER_SITE_STATE] in [m[1:] for m in mounts], f"{name}: state must be writable"
            superlink = service["command"][service["command"].index("--superlink") + 1]
            assert superlink == "server:9093"  # the name the server certificate was provisioned for
            assert not flags(service["command"]) - help_flags("flower-supernode")
    assert services["server"]["ports"] == ["9093:9093"]  # the health port stays unpublished


def _documents(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"].get("name"), f"{name}: incomplete object"
    return docs


@pytest.mark.parametrize(("manifest", "image", "kit_files"), [
    ("superlink.yaml", "server", kits.SERVER_KIT_FILES),
    ("site.yaml", "hospital", kits.SITE_KIT_FILES),
])
def test_k8s_manifests_mount_kit_files_and_probe_the_health_port(manifest: str, image: str, kit_files: tuple) -> None:
    docs = _documents(manifest)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    container = pod["containers"][0]
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, f"{manifest}: volumeMount {mount['name']} has no volume"
    kit_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == kits.CONTAINER_KIT)
    assert kit_mount["readOnly"] is True
    secret = volumes[kit_mount["name"]]["secret"]
    for item in secret["items"]:
        assert item["key"] in kit_files and item["path"] == item["key"], f"{manifest}: {item} is not a kit file"
    referenced = re.findall(rf"{kits.CONTAINER_KIT}/([\w.-]+)", " ".join(exec_form(DOCKERFILES[image], "ENTRYPOINT")))
    assert set(referenced) <= {i["path"] for i in secret["items"]}, f"{manifest}: the image reads a kit file the secret lacks"
    entry = exec_form(DOCKERFILES[image], "ENTRYPOINT")
    health_port = int(entry[entry.index("--health-server-address") + 1].rsplit(":", 1)[1])
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    state = next(m for m in container["volumeMounts"] if m["mountPath"].startswith("/var/lib/fedsynth"))
    assert volumes[state["name"]]["persistentVolumeClaim"]["claimName"] in claims
    if image == "hospital":
        scans = next(m for m in container["volumeMounts"] if m["mountPath"] == kits.CONTAINER_SCANS)
        assert scans["readOnly"] is True and volumes[scans["name"]]["persistentVolumeClaim"]["readOnly"] is True
        assert not flags(container["args"]) - help_flags("flower-supernode")
    else:
        service = next(d for d in docs if d["kind"] == "Service")
        assert [p["port"] for p in service["spec"]["ports"]] == [9093]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[service["spec"]["ports"][0]["targetPort"]] == 9093


def test_every_way_a_site_starts_its_supernode_sets_the_superexec_poll(kits_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hospital image, compose, Kubernetes and the kit's script agree on Flower's SuperExec settings."""
    from flwr.supercore.superexec.run_superexec import _get_task_poll_interval

    expected = dict(setting.split("=", 1) for setting in kits.SUPERNODE_ENV)
    assert expected == {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
    for name, value in expected.items():  # a variable Flower 1.42 reads, with a value it accepts
        monkeypatch.setenv(name, value)
    assert _get_task_poll_interval() == 0.1
    image_env = " ".join(args for keyword, args in parse_dockerfile(DOCKERFILES["hospital"]) if keyword == "ENV")
    for setting in kits.SUPERNODE_ENV:
        assert setting in image_env.split(), f"hospital.Dockerfile: ENV lacks {setting}"
    compose = yaml.safe_load(_substitute((DEPLOY / "compose.yaml").read_text(), kits_home))
    for site in COMPOSE_SITES:
        assert compose["services"][site]["environment"] == expected, f"compose.yaml: {site}"
    pod = next(d for d in _documents("site.yaml") if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {e["name"]: e["value"] for e in pod["containers"][0]["env"]} == expected, "k8s/site.yaml"
    script = (kits_home / "kits" / "sites" / COMPOSE_SITES[0] / kits.START_SUPERNODE).read_text()
    for name, value in expected.items():
        assert f'export {name}="${{{name}:-{value}}}"' in script
