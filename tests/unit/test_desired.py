"""Desired state: schema rules as data, release id stability, the bundled repo, and fuzzing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from property_profiles import examples

from deployerd.desired import (
    DesiredState,
    HostSpec,
    ManifestError,
    Release,
    ServiceSpec,
    expected_registry_entry,
    load_desired,
)
from deployerd.tree import DirTree

REPO_ROOT = Path(__file__).resolve().parents[2]

HOSTS = {"hosts": {"prod-1": {"address": "10.0.0.1"}, "prod-2": {"address": "db.example.com", "ssh_port": 2222}}}
WEB = {"name": "web", "droplet_id": 1, "host": "prod-1", "port": 8080, "source": "services/web",
       "env": {"GREETING": "hi"}}
API = {"name": "api", "droplet_id": 2, "host": "prod-1", "port": 8081, "source": "services/api"}


def build(root: Path, files: dict[str, Any]) -> DirTree:
    """Write a repo: dict/list values become YAML, str/bytes are written as is, None deletes."""
    base: dict[str, Any] = {
        "hosts.yaml": HOSTS,
        "services/web.yaml": WEB,
        "services/web/Dockerfile": "FROM busybox:latest\n",
        "services/web/www/index.html": "<p>web</p>\n",
        "services/api.yaml": API,
        "services/api/Dockerfile": "FROM busybox:latest\n",
    }
    base.update(files)
    for rel, content in base.items():
        if content is None:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, (dict, list)):
            content = yaml.safe_dump(content)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return DirTree(root)


def load(tmp_path: Path, files: dict[str, Any] | None = None) -> DesiredState:
    return load_desired(build(tmp_path, files or {}), "rev")


def only_error(state: DesiredState) -> ManifestError:
    assert len(state.errors) == 1, state.errors
    return state.errors[0]


# --------------------------------------------------------------------------- happy path


def test_valid_repo_loads(tmp_path: Path) -> None:
    state = load(tmp_path)
    assert state.errors == [] and state.broken == set() and state.complete
    assert set(state.services) == {"web", "api"}
    web = state.services["web"]
    assert web.method == "docker" and web.register and web.health.path == "/health"
    assert web.container_port == 8080 and web.docker.restart == "unless-stopped"
    assert state.hosts["prod-1"] == HostSpec(name="prod-1", address="10.0.0.1")
    assert state.hosts["prod-2"].ssh_port == 2222
    assert set(state.releases["web"].inputs) == {"source", "image", "env", "port", "health", "host"}
    assert len(state.releases["web"].id) == 12


def test_bundled_desired_state_loads_without_errors() -> None:
    state = load_desired(DirTree(REPO_ROOT / "desired_state"), "bundled")
    assert state.errors == [] and state.broken == set()
    assert {n: (s.droplet_id, s.port, s.host, s.method) for n, s in state.services.items()} == {
        "hello-web": (20, 8010, "sbx-1", "docker"), "hello-api": (21, 8011, "sbx-1", "docker"),
        "hello-py": (22, 8012, "sbx-1", "systemd")}
    assert state.hosts["sbx-1"].address == "127.0.0.1"


def test_yml_extension_and_subfolders_ignored(tmp_path: Path) -> None:
    state = load(tmp_path, {"services/api.yaml": None, "services/api.yml": API,
                            "services/web/nested.yaml": "not: [a manifest",
                            "services/README.md": "docs"})
    assert state.errors == [] and set(state.services) == {"web", "api"}


# --------------------------------------------------------------------------- service rules


def web_with(**changes: Any) -> dict[str, Any]:
    body = {**WEB, **changes}
    return {k: v for k, v in body.items() if v is not None}


SERVICE_CASES = [
    ("port-high", {"services/web.yaml": web_with(port=70000)}, "port", "must be between 1 and 65535"),
    ("port-zero", {"services/web.yaml": web_with(port=0)}, "port", "must be between 1 and 65535"),
    ("port-string", {"services/web.yaml": web_with(port="8080")}, "port", "must be an integer"),
    ("port-missing", {"services/web.yaml": web_with(port=None)}, "port", "required field missing"),
    ("name-upper", {"services/Web.yaml": web_with(name="Web"), "services/web.yaml": None}, "name", "DNS label"),
    ("name-long", {f"services/{'a' * 64}.yaml": web_with(name="a" * 64), "services/web.yaml": None},
     "name", "DNS label"),
    ("name-stem", {"services/web.yaml": web_with(name="other")}, "name", "must equal the file name 'web'"),
    ("unknown-field", {"services/web.yaml": web_with(colour="red")}, "colour", "unknown field"),
    ("unknown-nested", {"services/web.yaml": web_with(health={"pth": "/x"})}, "health.pth", "unknown field"),
    ("timeout-zero", {"services/web.yaml": web_with(health={"timeout_s": 0})}, "health.timeout_s", "greater than 0"),
    ("timeout-big", {"services/web.yaml": web_with(health={"timeout_s": 601})}, "health.timeout_s", "600"),
    ("health-path", {"services/web.yaml": web_with(health={"path": "health"})}, "health.path", "start with '/'"),
    ("health-space", {"services/web.yaml": web_with(health={"path": "/a b"})}, "health.path", "without spaces"),
    ("health-url", {"services/web.yaml": web_with(health={"url": "file:///etc/passwd"})}, "health.url", "http"),
    ("method", {"services/web.yaml": web_with(method="k8s")}, "method", "'docker', 'systemd' or 'swarm'"),
    ("restart", {"services/web.yaml": web_with(docker={"restart": "sometimes"})}, "docker.restart", "must be"),
    ("unknown-host", {"services/web.yaml": web_with(host="prod-9")}, "host", "unknown host 'prod-9'"),
    ("host-label", {"services/web.yaml": web_with(host="prod_1; rm")}, "host", "DNS label"),
    ("env-key", {"services/web.yaml": web_with(env={"BAD-KEY": "x"})}, "env", "BAD-KEY"),
    ("env-newline", {"services/web.yaml": web_with(env={"A": "x\ny"})}, "env", "newline"),
    ("env-nul", {"services/web.yaml": web_with(env={"A": "x\0y"})}, "env", "NUL"),
    ("env-int", {"services/web.yaml": web_with(env={"A": 1})}, "env.A", "must be a string"),
    ("register-str", {"services/web.yaml": web_with(register="yes")}, "register", "true or false"),
    ("droplet-neg", {"services/web.yaml": web_with(droplet_id=-1)}, "droplet_id", "greater than or equal to 1"),
    ("source-abs", {"services/web.yaml": web_with(source="/etc")}, "source", "relative path"),
    ("source-dotdot", {"services/web.yaml": web_with(source="services/../..")}, "source", "'..'"),
    ("source-root", {"services/web.yaml": web_with(source=".")}, "source", "normalized"),
    ("source-shell", {"services/web.yaml": web_with(source="services/web;rm")}, "source", "only letters"),
    ("source-missing", {"services/web.yaml": web_with(source="services/nope")}, "source", "not found"),
    ("source-is-file", {"services/web.yaml": web_with(source="services/web/Dockerfile")}, "source", "not found"),
    ("dockerfile-missing", {"services/web/Dockerfile": None}, "docker.dockerfile", "not a file"),
    ("dockerfile-abs", {"services/web.yaml": web_with(docker={"dockerfile": "/Dockerfile"})},
     "docker.dockerfile", "relative path"),
    ("dockerfile-escape", {"services/web.yaml": web_with(docker={"dockerfile": "../api/Dockerfile"})},
     "docker.dockerfile", "'..'"),
    ("container-port", {"services/web.yaml": web_with(docker={"container_port": 0})},
     "docker.container_port", "between 1 and 65535"),
    ("build-arg", {"services/web.yaml": web_with(docker={"build_args": {"A B": "x"}})}, "docker.build_args", "A B"),
    ("systemd-user", {"services/web.yaml": web_with(systemd={"user": "Root!"})}, "systemd.user", "POSIX"),
    ("systemd-cmd", {"services/web.yaml": web_with(systemd={"command": "a\nb"})}, "systemd.command", "newline"),
    ("not-mapping", {"services/web.yaml": "- a\n- b\n"}, "", "must be a YAML mapping"),
    ("empty", {"services/web.yaml": ""}, "", "file is empty"),
    ("yaml-syntax", {"services/web.yaml": "name: web\nport: [8080\n"}, "", "line 3"),
    ("yaml-alias", {"services/web.yaml": "a: &x 1\nname: *x\n"}, "", "aliases"),
    ("yaml-dup", {"services/web.yaml": "name: web\nport: 1\nport: 2\n"}, "", "duplicate key 'port'"),
    ("not-utf8", {"services/web.yaml": b"name: \xff\n"}, "", "not UTF-8"),
]


@pytest.mark.parametrize(("files", "field", "reason"), [c[1:] for c in SERVICE_CASES],
                         ids=[c[0] for c in SERVICE_CASES])
def test_service_rule(tmp_path: Path, files: dict[str, Any], field: str, reason: str) -> None:
    state = load(tmp_path, files)
    err = only_error(state)
    assert err.file.startswith("services/") and err.file.endswith((".yaml", ".yml"))
    assert err.field == field and reason in err.reason, str(err)
    stem = Path(err.file).stem
    assert state.broken == {stem} and stem not in state.services
    assert "api" in state.services  # one broken manifest fails that service alone


def test_error_str_names_file_field_reason(tmp_path: Path) -> None:
    err = only_error(load(tmp_path, {"services/web.yaml": web_with(port=70000)}))
    assert str(err) == "services/web.yaml: port: must be between 1 and 65535"
    err = only_error(load(tmp_path / "b", {"services/web.yaml": "name: web\nport: [8080\n"}))
    assert str(err).startswith("services/web.yaml: YAML syntax error at line 3")


def test_duplicate_port_on_host_names_both(tmp_path: Path) -> None:
    state = load(tmp_path, {"services/api.yaml": {**API, "port": 8080}})
    assert state.broken == {"web", "api"} and state.services == {}
    by_file = {e.file: e for e in state.errors}
    assert by_file["services/web.yaml"].field == "port" and "api" in by_file["services/web.yaml"].reason
    assert "web" in by_file["services/api.yaml"].reason and "8080" in by_file["services/api.yaml"].reason


def test_same_port_on_different_hosts_is_fine(tmp_path: Path) -> None:
    state = load(tmp_path, {"services/api.yaml": {**API, "port": 8080, "host": "prod-2"}})
    assert state.errors == []


def test_duplicate_droplet_id(tmp_path: Path) -> None:
    state = load(tmp_path, {"services/api.yaml": {**API, "droplet_id": 1}})
    assert state.broken == {"web", "api"}
    assert {(e.file, e.field) for e in state.errors} == {("services/web.yaml", "droplet_id"),
                                                         ("services/api.yaml", "droplet_id")}


def test_yaml_and_yml_for_one_service(tmp_path: Path) -> None:
    state = load(tmp_path, {"services/web.yml": WEB})
    assert state.broken == {"web"} and {e.file for e in state.errors} == {"services/web.yaml", "services/web.yml"}


# --------------------------------------------------------------------------- source folder safety


@pytest.mark.parametrize(("link", "target"), [
    ("services/web/www/abs", "/etc/passwd"),
    ("services/web/up", "../api/Dockerfile"),
    ("services/web/www/up2", "../../web.yaml"),
    ("services/web/www/sneaky", "self/../../../hosts.yaml"),  # lexically inside, really outside
])
def test_symlink_escape_refused(tmp_path: Path, link: str, target: str) -> None:
    tree = build(tmp_path, {})
    os.symlink(".", tmp_path / "services/web/www/self")
    os.symlink(target, tmp_path / link)
    err = only_error(load_desired(tree, "rev"))
    assert (err.file, err.field) == ("services/web.yaml", "source")
    assert link in err.reason and ("outside" in err.reason or "absolute" in err.reason)


def test_symlink_inside_source_allowed(tmp_path: Path) -> None:
    tree = build(tmp_path, {})
    os.symlink("www/index.html", tmp_path / "services/web/index.html")
    os.symlink("../www", tmp_path / "services/web/www/loop-ok")
    state = load_desired(tree, "rev")
    assert state.errors == []


def test_symlinked_source_folder_refused(tmp_path: Path) -> None:
    tree = build(tmp_path, {"services/web.yaml": web_with(source="services/alias")})
    os.symlink("web", tmp_path / "services/alias")
    err = only_error(load_desired(tree, "rev"))
    assert (err.field, "not found" in err.reason) == ("source", True)


def test_fifo_in_source_refused(tmp_path: Path) -> None:
    tree = build(tmp_path, {})
    os.mkfifo(tmp_path / "services/web/pipe")
    err = only_error(load_desired(tree, "rev"))
    assert err.field == "source" and "services/web/pipe" in err.reason


def test_symlinked_manifest_refused(tmp_path: Path) -> None:
    tree = build(tmp_path, {"services/web.yaml": None, "elsewhere.yaml": WEB})
    os.symlink("../elsewhere.yaml", tmp_path / "services/web.yaml")
    err = only_error(load_desired(tree, "rev"))
    assert err.file == "services/web.yaml" and "regular file" in err.reason


# --------------------------------------------------------------------------- hosts.yaml


def hosts_with(**prod1: Any) -> dict[str, Any]:
    return {"hosts": {"prod-1": {"address": "10.0.0.1", **prod1}}}


HOST_CASES = [
    ("addr-shell", hosts_with(address="10.0.0.1; rm -rf /"), "hosts.prod-1.address", "hostname or an IP"),
    ("addr-dash", hosts_with(address="-oProxyCommand=x"), "hosts.prod-1.address", "hostname or an IP"),
    ("user", hosts_with(user="root;id"), "hosts.prod-1.user", "POSIX"),
    ("ssh-port", hosts_with(ssh_port=0), "hosts.prod-1.ssh_port", "between 1 and 65535"),
    ("base-rel", hosts_with(base_dir="opt/x"), "hosts.prod-1.base_dir", "absolute"),
    ("base-dotdot", hosts_with(base_dir="/opt/../srv/x"), "hosts.prod-1.base_dir", "'..'"),
    ("base-etc", hosts_with(base_dir="/opt/../etc"), "hosts.prod-1.base_dir", "system directory"),
    ("base-chars", hosts_with(base_dir="/opt/$HOME"), "hosts.prod-1.base_dir", "only letters"),
    ("base-root", hosts_with(base_dir="/"), "hosts.prod-1.base_dir", "root"),
    ("public", hosts_with(public_address="a b"), "hosts.prod-1.public_address", "hostname or an IP"),
    ("unknown", hosts_with(colour="red"), "hosts.prod-1.colour", "unknown field"),
    ("missing-addr", {"hosts": {"prod-1": {}}}, "hosts.prod-1.address", "required field missing"),
    ("name", {"hosts": {"Prod_1": {"address": "10.0.0.1"}}}, "hosts.Prod_1.name", "DNS label"),
    ("no-hosts", {"servers": {}}, "servers", "unknown field"),
]


@pytest.mark.parametrize(("hosts", "field", "reason"), [c[1:] for c in HOST_CASES], ids=[c[0] for c in HOST_CASES])
def test_hosts_rule_breaks_every_service(tmp_path: Path, hosts: Any, field: str, reason: str) -> None:
    state = load(tmp_path, {"hosts.yaml": hosts})
    host_errors = [e for e in state.errors if e.file == "hosts.yaml"]
    assert any(e.field == field and reason in e.reason for e in host_errors), host_errors
    assert state.services == {} and state.broken == {"web", "api"} and not state.complete


def test_hosts_file_missing(tmp_path: Path) -> None:
    state = load(tmp_path, {"hosts.yaml": None})
    assert [str(e) for e in state.errors] == ["hosts.yaml: file not found"]
    assert state.broken == {"web", "api"} and not state.complete


def test_hosts_accepts_ipv6_and_fqdn(tmp_path: Path) -> None:
    state = load(tmp_path, {"hosts.yaml": {"hosts": {"prod-1": {"address": "fd00::1", "public_address": "a.example.org",
                                                                 "user": "deploy", "base_dir": "/srv/apps"}}}})
    assert state.errors == []
    spec, host = state.services["web"], state.hosts["prod-1"]
    entry = expected_registry_entry(spec, host, state.releases["web"])
    assert entry["endpoint"] == "http://a.example.org:8080"
    v6 = host.model_copy(update={"public_address": None})
    assert expected_registry_entry(spec, v6, state.releases["web"])["endpoint"] == "http://[fd00::1]:8080"


# --------------------------------------------------------------------------- releases


def test_release_stable_when_other_service_changes(tmp_path: Path) -> None:
    before = load(tmp_path / "a")
    after = load(tmp_path / "b", {"services/api/Dockerfile": "FROM busybox:1\n",
                                  "services/api.yaml": {**API, "env": {"X": "1"}}, "README.md": "new"})
    assert before.releases["web"] == after.releases["web"]
    assert before.releases["api"].id != after.releases["api"].id


def test_env_change_changes_only_env_input(tmp_path: Path) -> None:
    before = load(tmp_path / "a").releases["web"]
    after = load(tmp_path / "b", {"services/web.yaml": web_with(env={"GREETING": "hello"})}).releases["web"]
    assert before.id != after.id
    assert {k for k in before.inputs if before.inputs[k] != after.inputs[k]} == {"env"}


@pytest.mark.parametrize(("files", "changed"), [
    ({"services/web/www/index.html": "<p>new</p>"}, {"source"}),
    ({"services/web/www/new.txt": "x"}, {"source"}),
    ({"services/web.yaml": web_with(port=9090)}, {"port"}),
    ({"services/web.yaml": web_with(health={"path": "/up"})}, {"health"}),
    ({"services/web.yaml": web_with(docker={"restart": "always"})}, {"image"}),
    ({"services/web.yaml": web_with(systemd={"command": "other"})}, set()),  # not the chosen method
    ({"services/web.yaml": web_with(droplet_id=7, register=False)}, set()),  # registry only
    ({"services/web.yaml": web_with(host="prod-2")}, {"host"}),
])
def test_each_input_changes_alone(tmp_path: Path, files: dict[str, Any], changed: set[str]) -> None:
    before = load(tmp_path / "a").releases["web"]
    after = load(tmp_path / "b", files).releases["web"]
    assert {k for k in before.inputs if before.inputs[k] != after.inputs[k]} == changed
    assert (before.id != after.id) == bool(changed)


def test_env_values_never_appear_in_release(tmp_path: Path) -> None:
    secret = "s3cr3t-value-123"
    state = load(tmp_path, {"services/web.yaml": web_with(env={"TOKEN": secret})})
    assert secret not in state.releases["web"].model_dump_json()


def test_expected_registry_entry_shape() -> None:
    spec = ServiceSpec.model_validate(WEB)
    host = HostSpec(name="prod-1", address="10.0.0.1")
    assert expected_registry_entry(spec, host, Release(id="abc123abc123", inputs={}), "staging") == {
        "endpoint": "http://10.0.0.1:8080", "status": "active",
        "metadata": {"managed_by": "deployerd", "instance": "staging", "release": "abc123abc123", "host": "prod-1",
                     "method": "docker"}}


# --------------------------------------------------------------------------- fuzzing

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20), st.sampled_from(["web", "prod-1", "services/web", "/", "..", "8080"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3)),
    max_leaves=10)
_fields = st.sampled_from(list(WEB) + ["method", "health", "docker", "systemd", "register", "bogus"])
_manifests = st.dictionaries(_fields, _values, max_size=8).map(lambda d: {**WEB, **d})


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=_manifests)
def test_random_manifest_dicts_never_crash(tmp_path_factory: pytest.TempPathFactory, manifest: dict[str, Any]) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    try:
        text = yaml.safe_dump(manifest)
    except yaml.YAMLError:
        return
    state = load_desired(build(root, {"services/web.yaml": text}), "rev")
    _check_consistent(state)
    shutil.rmtree(root)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200),
                      st.sampled_from(["a: &x [*x]", "!!python/object:os.system {}", "{", "a: b: c", "? [a]\n: 1",
                                       "port: 08", "port: 0x1F", "name: web\nname: web", "- - -"])))
def test_random_yaml_text_never_crashes(tmp_path_factory: pytest.TempPathFactory, text: str | bytes) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    state = load_desired(build(root, {"services/web.yaml": text, "hosts.yaml": text}), "rev")
    _check_consistent(state)
    shutil.rmtree(root)


def _check_consistent(state: DesiredState) -> None:
    for err in state.errors:
        assert isinstance(err, ManifestError) and err.file in ("services/web.yaml", "services/api.yaml", "hosts.yaml")
        assert err.reason
    if "web" not in state.services:
        assert "web" in state.broken and any(e.file == "services/web.yaml" or e.file == "hosts.yaml"
                                             for e in state.errors)
    assert not (set(state.services) & state.broken)


@pytest.mark.parametrize("base_dir", ["/etc", "/etc/", "/etc/../etc", "//etc", "/./etc", "/usr", "/usr/lib",
                                      "/bin", "/sbin", "/lib64", "/boot", "/dev", "/proc", "/sys", "/run", "/var",
                                      "/var/", "/root", "/home", "/tmp", "/var/lib", "/usr/local", "/usr/local/bin",
                                      "/etc/deployerd"])
def test_base_dir_refuses_system_directories(tmp_path: Path, base_dir: str) -> None:
    state = load(tmp_path, {"hosts.yaml": hosts_with(base_dir=base_dir)})
    errors = [e for e in state.errors if e.file == "hosts.yaml" and e.field == "hosts.prod-1.base_dir"]
    assert errors and "system directory" in errors[0].reason, state.errors
    assert not state.complete and state.services == {}


@pytest.mark.parametrize(("base_dir", "normal"), [("/opt/deployerd/services", "/opt/deployerd/services"),
                                                  ("/srv/apps/", "/srv/apps"),
                                                  ("/usr/local/deployerd", "/usr/local/deployerd"),
                                                  ("/home/deploy/services", "/home/deploy/services"),
                                                  ("/var/lib/deployerd", "/var/lib/deployerd")])
def test_base_dir_accepts_own_folders_normalised(tmp_path: Path, base_dir: str, normal: str) -> None:
    state = load(tmp_path, {"hosts.yaml": hosts_with(base_dir=base_dir)})
    assert state.errors == [] and state.hosts["prod-1"].base_dir == normal


@pytest.mark.parametrize(("second", "shown"), [({"address": "10.0.0.1"}, "10.0.0.1 port 22"),
                                               ({"address": "10.0.0.1", "ssh_port": 22, "user": "deploy"},
                                                "10.0.0.1 port 22"),
                                               ({"address": "fd00:0::1", "ssh_port": 2222}, "fd00::1 port 2222")])
def test_two_entries_for_one_machine_are_refused(tmp_path: Path, second: dict[str, Any], shown: str) -> None:
    first = {"address": second["address"].replace("fd00:0::1", "fd00::1"), "ssh_port": second.get("ssh_port", 22)}
    state = load(tmp_path, {"hosts.yaml": {"hosts": {"prod-1": first, "prod-1b": second}}})
    assert sorted(str(e) for e in state.errors) == [
        f"hosts.yaml: hosts.prod-1: reaches the same machine as prod-1b ({shown}): one entry per machine",
        f"hosts.yaml: hosts.prod-1b: reaches the same machine as prod-1 ({shown}): one entry per machine"]
    assert not state.complete and state.services == {}


def test_same_address_other_port_is_two_machines(tmp_path: Path) -> None:
    state = load(tmp_path, {"hosts.yaml": {"hosts": {"prod-1": {"address": "10.0.0.1"},
                                                     "prod-2": {"address": "10.0.0.1", "ssh_port": 2222}}}})
    assert state.errors == [] and state.complete


def test_newcomer_clashing_with_an_unchanged_service_is_the_one_blocked(tmp_path: Path) -> None:
    before = load(tmp_path / "a")
    newcomer = {**API, "name": "nc", "port": WEB["port"], "droplet_id": 3, "source": "services/api"}
    tree = build(tmp_path / "b", {"services/nc.yaml": newcomer})
    state = load_desired(tree, "rev2", before.services)
    assert state.broken == {"nc"} and set(state.services) == {"web", "api"}
    assert [str(e) for e in state.errors] == [
        "services/nc.yaml: port: port 8080 on host prod-1 is already used by web (services/web.yaml, unchanged "
        "since the last applied commit): nc is blocked, web keeps running"]
    # with no last applied commit (or when both changed) neither wins, and each error names the other's file
    alone = load_desired(tree, "rev2")
    assert alone.broken == {"nc", "web"}
    assert "services/web.yaml: port: port 8080 on host prod-1 is also used by nc (services/nc.yaml)" in \
        [str(e) for e in alone.errors]
    changed = build(tmp_path / "c", {"services/nc.yaml": newcomer, "services/web.yaml": {**WEB, "env": {"A": "1"}}})
    assert load_desired(changed, "rev3", before.services).broken == {"nc", "web"}
