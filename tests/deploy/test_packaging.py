"""Dockerfile, compose, systemd and Kubernetes files: they parse, reference files that exist,
and keep the promises made in docs/operations.md (non-root, drain timeouts, probes)."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.config import Settings, load_settings, parse_settings
from tests.deploy.promql import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "systemd" / "connector.service"
K8S = DEPLOY / "kubernetes"
DRAIN = Settings.model_fields["server"].default.drain_timeout
SECRETISH = re.compile(r"(secret|token|passw|api_?key|credential|private)", re.IGNORECASE)


# -- Dockerfile -------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_and_runs_unprivileged() -> None:
    ins = _instructions(DOCKERFILE.read_text())
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2
    stages = [re.search(r"\bAS\s+(\S+)", f, re.I) for f in froms]
    assert all(stages)
    # the last stage takes only the built environment from the build stage
    last = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    tail = ins[last:]
    assert any(w == "COPY" and r.startswith("--from=") for w, r in tail)
    assert not any(w == "RUN" and re.search(r"pip install|apt-get install|gcc", r) for w, r in tail)
    users = [r for w, r in tail if w == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert [r for w, r in tail if w == "HEALTHCHECK"]
    assert "/healthz" in next(r for w, r in tail if w == "HEALTHCHECK")
    entry = [r for w, r in tail if w == "ENTRYPOINT"]
    assert entry and entry[-1] == '["connector", "run"]'


def test_dockerfile_has_no_secrets() -> None:
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word in {"ENV", "ARG", "LABEL"}:
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)=", rest) or [rest.split()[0]]:
                assert not SECRETISH.search(key), (word, key)


def test_dockerfile_copy_sources_exist() -> None:
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word != "COPY" or rest.startswith("--from="):
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the build context (repository root)"


# -- compose ----------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_references_existing_files() -> None:
    doc = _compose()
    base = COMPOSE.parent
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (base / src).exists(), (name, src)
        for env_file in svc.get("env_file", []):
            assert (base / env_file).is_file(), (name, env_file)
        build = svc.get("build")
        if build:
            assert (base / build["context"] / build["dockerfile"]).is_file()
        for s in svc.get("secrets", []):
            assert s in doc["secrets"], (name, s)
        for c in svc.get("configs", []):
            assert c["source"] in doc["configs"], (name, c)
    for section in ("secrets", "configs"):
        for entry in doc[section].values():
            assert (base / entry["file"]).is_file(), entry


def test_compose_services() -> None:
    svcs = _compose()["services"]
    assert {"postgres", "emulator", "connector", "prometheus", "grafana"} <= set(svcs)
    assert "wal_level=logical" in svcs["postgres"]["command"]
    assert svcs["emulator"]["entrypoint"] + svcs["emulator"]["command"] == [
        "connector",
        "emulator",
        "--host",
        "0.0.0.0",
        "--port",
        "8799",
    ]
    stop = svcs["connector"]["stop_grace_period"]
    assert timedelta(seconds=int(stop.rstrip("s"))) > DRAIN
    # the prometheus folder mounted holds the config and the rules it loads
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rf in prom["rule_files"]:
        assert (DEPLOY / "prometheus" / rf).is_file()
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["connector:9108"]
    # grafana: dashboards provider path is where compose mounts the dashboard
    prov = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "connector.yaml").read_text()
    )
    path = prov["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(path + "/") for v in svcs["grafana"]["volumes"])


def test_compose_connector_config_is_valid() -> None:
    s = load_settings(DEPLOY / "compose" / "connector.toml")
    assert s.server.host == "0.0.0.0"
    assert s.crm.resolved_api_url == "http://emulator:8799"
    mounted = {f"/run/secrets/{n}" for n in _compose()["services"]["connector"]["secrets"]}
    assert {s.crm.client_secret_file, s.crm.refresh_token_file} <= mounted


def test_compose_init_sql_creates_the_table_the_config_reads() -> None:
    s = load_settings(DEPLOY / "compose" / "connector.toml")
    sql = (DEPLOY / "compose" / "initdb" / "10-legacy-orders.sql").read_text()
    p = s.pipelines[0]
    assert f"CREATE TABLE {p.source_table}" in sql
    for column in [p.key_column, *p.fields]:
        assert re.search(rf"^\s+{column}\s", sql, re.M), column
    role = (DEPLOY / "compose" / "initdb" / "20-connector-role.sh").read_text()
    assert os.access(DEPLOY / "compose" / "initdb" / "20-connector-role.sh", os.X_OK)
    assert f"GRANT SELECT, TRIGGER ON TABLE {p.source_table} TO connector_app" in role
    assert "user=connector_app" in (s.database.dsn or "")


# -- systemd ----------------------------------------------------------------------------------


def _unit() -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_systemd_unit_is_hardened() -> None:
    u = _unit()
    svc = u["Service"]
    assert svc["User"] not in {"root", "0"}
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["PrivateTmp"] == "yes"
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert svc["Restart"] == "on-failure"
    assert timedelta(seconds=int(svc["TimeoutStopSec"])) > DRAIN
    assert svc["ExecStart"].endswith("connector run --config /etc/connector/connector.toml")
    assert "WantedBy" in u["Install"]


def test_systemd_credentials_match_the_example_config() -> None:
    text = UNIT.read_text()
    creds = set(re.findall(r"^LoadCredential=([^:]+):", text, re.M))
    assert creds == {"zoho_client_secret", "zoho_refresh_token", "pgpass"}
    s = load_settings(DEPLOY / "systemd" / "connector.toml.example")
    base = "/run/credentials/connector.service/"
    assert s.crm.client_secret_file == base + "zoho_client_secret"
    assert s.crm.refresh_token_file == base + "zoho_refresh_token"
    assert "Environment=PGPASSFILE=%d/pgpass" in text
    assert "password" not in (s.database.dsn or "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at a stand-in
    exe = tmp_path / "connector"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "connector.service"
    unit.write_text(UNIT.read_text().replace("/opt/connector/bin/connector", str(exe)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # unknown keys are only warned about: any output is a finding
    assert out.stderr.strip() == "" and out.stdout.strip() == "", out.stderr + out.stdout


# -- Kubernetes -------------------------------------------------------------------------------


def _k8s() -> dict[str, dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: dict[str, dict[str, Any]] = {}
    for res in kust["resources"]:
        path = K8S / res
        assert path.is_file(), res
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), res
            docs[doc["kind"]] = doc
    listed = {K8S / r for r in kust["resources"]}
    assert {p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"} == listed
    return docs


def test_kubernetes_deployment() -> None:
    docs = _k8s()
    dep = docs["Deployment"]
    spec = dep["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert timedelta(seconds=pod["terminationGracePeriodSeconds"]) > DRAIN
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # selector, service and service monitor agree
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in c["ports"]}
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] in port_names
    sm = docs["ServiceMonitor"]
    assert (
        sm["spec"]["selector"]["matchLabels"].items()
        <= docs["Service"]["metadata"]["labels"].items()
    )
    assert sm["spec"]["endpoints"][0]["port"] == docs["Service"]["spec"]["ports"][0]["name"]
    # the job label Prometheus gives it is the Service's name, which alerts.yml expects
    assert docs["Service"]["metadata"]["name"] == "connector"
    assert 'job="connector"' in (DEPLOY / "prometheus" / "alerts.yml").read_text()


def test_kubernetes_mounts_config_and_secrets_the_config_names() -> None:
    docs = _k8s()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    c = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    cm = docs["ConfigMap"]
    cfg_vol = volumes["config"]["configMap"]
    assert cfg_vol["name"] == cm["metadata"]["name"]
    key = cfg_vol["items"][0]["key"]
    assert f"{mounts['config']}/{cfg_vol['items'][0]['path']}" == c["args"][-1]
    settings = parse_settings(tomllib.loads(cm["data"][key]))
    assert settings.server.port == c["ports"][0]["containerPort"]
    assert settings.server.host == "0.0.0.0"
    secret = docs["Secret"]
    sec_vol = volumes["secrets"]["secret"]
    assert sec_vol["secretName"] == secret["metadata"]["name"]
    files = {f"{mounts['secrets']}/{i['path']}" for i in sec_vol["items"]}
    assert {settings.crm.client_secret_file, settings.crm.refresh_token_file} <= files
    for i in sec_vol["items"]:
        assert i["key"] in secret["stringData"]
    assert sec_vol["defaultMode"] & 0o007 == 0  # not world-readable
    for env in c["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # no value committed in the Secret
    assert all(v == "" for v in secret["stringData"].values())


# -- the production package ---------------------------------------------------------------------


def test_embedded_postgres_is_an_extra_not_a_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "pgserver" not in runtime
    assert any(d.startswith("pgserver") for d in project["optional-dependencies"]["embedded"])
    # the image installs the production package only
    install = [rest for word, rest in _instructions(DOCKERFILE.read_text()) if word == "RUN"]
    assert any("pip install ." in r for r in install)
    assert not any("embedded" in r or "pgserver" in r for r in install)
    # make demo / make test install the extra
    assert "'.[dev,embedded]'" in (ROOT / "Makefile").read_text()


def test_missing_embedded_extra_is_a_clear_message() -> None:
    code = (
        "import sys; sys.modules['pgserver'] = None\n"
        "from connector.errors import ConnectorError\n"
        "from connector.pgembed import bin_dir\n"
        "try:\n    bin_dir()\nexcept ConnectorError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "pip install 'zoho-cdc-connector[embedded]'" in out.stdout
