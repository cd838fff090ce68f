"""``fedsynth provision``: what the kits hold, in which format and mode, and what a re-run refuses."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from client.audit_policy import enforce_audit_policy
from client.memorisation_audit import AuditRequest
from client.policy import SitePolicy, check_app, load_site_policy, running_app_hash
from common.config import load_site_config
from common.errors import PolicyError
from server import kits
from server.cli import main
from server.provision import ProvisionError, ProvisionRequest, provision

SITES = ("hospital-a", "hospital-b")


@pytest.fixture()
def provisioned(tmp_path: Path) -> kits.Layout:
    return provision(ProvisionRequest(out=tmp_path / "fed", sites=SITES, server_host="fl.example.org",
                                      extra_hosts=("10.0.0.7",), epsilon=6.5)).layout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_kits_hold_exactly_the_expected_files(provisioned: kits.Layout) -> None:
    server_files = {p.relative_to(provisioned.server_dir).as_posix() for p in provisioned.server_dir.rglob("*") if p.is_file()}
    assert server_files == set(kits.SERVER_KIT_FILES) | {f"site-keys/{s}.pub" for s in SITES}
    for site in SITES:
        site_files = {p.name for p in provisioned.site_dir(site).iterdir()}
        assert site_files == set(kits.SITE_KIT_FILES)


def test_private_keys_are_0600_in_0700_folders_and_scripts_run(provisioned: kits.Layout) -> None:
    for key in [provisioned.ca_key, provisioned.server_dir / kits.SERVER_KEY, *(provisioned.site_key(s) for s in SITES)]:
        assert _mode(key) == 0o600, key
        assert _mode(key.parent) == 0o700, key.parent
    for script in [provisioned.server_dir / kits.START_SUPERLINK, provisioned.server_dir / kits.REGISTER_SITES,
                   *(provisioned.site_dir(s) / kits.START_SUPERNODE for s in SITES)]:
        assert _mode(script) == 0o755
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0, f"{script} is not valid sh"


def test_no_private_key_leaves_its_own_kit(provisioned: kits.Layout) -> None:
    everything = {p: p.read_bytes() for p in provisioned.root.rglob("*") if p.is_file()}
    private = {provisioned.ca_key, provisioned.server_dir / kits.SERVER_KEY, *(provisioned.site_key(s) for s in SITES)}
    for key_path in private:
        key = everything[key_path].strip()
        holders = [p for p, data in everything.items() if key in data]
        assert holders == [key_path]
    for site in SITES:  # and no kit carries a private key it should not have
        kit_bytes = b"".join(p.read_bytes() for p in provisioned.site_dir(site).iterdir())
        assert kit_bytes.count(b"PRIVATE KEY-----") == 2  # its own key's BEGIN and END lines
    server_bytes = b"".join(p.read_bytes() for p in provisioned.server_dir.rglob("*") if p.is_file())
    assert server_bytes.count(b"PRIVATE KEY-----") == 2  # server.key only


def test_site_keys_are_in_the_formats_flower_reads(provisioned: kits.Layout) -> None:
    for site in SITES:
        # what flower-supernode --auth-supernode-private-key does with the file
        private = load_ssh_private_key(provisioned.site_key(site).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        registered = provisioned.registered_key(site).read_bytes()
        assert registered == (provisioned.site_dir(site) / kits.NODE_PUB).read_bytes()
        assert registered.startswith(b"ecdsa-sha2-nistp384 ")
        # what `flwr supernode register KEY.pub` does with the file
        pem = try_load_public_key(provisioned.registered_key(site))
        assert load_ssh_public_key(registered).public_numbers() == private.public_key().public_numbers()
        assert b"BEGIN PUBLIC KEY" in pem


def test_server_certificate_is_signed_by_the_ca_for_every_host(provisioned: kits.Layout) -> None:
    ca = x509.load_pem_x509_certificate(provisioned.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate((provisioned.server_dir / kits.SERVER_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("127.0.0.1")}
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for kit in [provisioned.server_dir, *(provisioned.site_dir(s) for s in SITES)]:
        assert (kit / kits.CA_CERT).read_bytes() == provisioned.ca_cert.read_bytes()


def test_site_config_template_loads_with_the_sites_budget(provisioned: kits.Layout) -> None:
    site = load_site_config(provisioned.site_dir("hospital-b") / kits.SITE_CONFIG)
    assert site.site_id == "hospital-b"
    assert (site.privacy_budget.epsilon, site.privacy_budget.delta) == (6.5, 1e-5)
    assert (site.data_dir, site.state_dir) == (kits.CONTAINER_SCANS, kits.CONTAINER_SITE_STATE)
    assert not site.allow_non_private
    script = (provisioned.site_dir("hospital-b") / kits.START_SUPERNODE).read_text()
    assert "fl.example.org:9093" in script


def test_start_supernode_hands_flowers_settings_to_the_supernode(provisioned: kits.Layout, tmp_path: Path) -> None:
    # A stand-in flower-supernode on PATH prints what the kit's script hands it.
    fake = tmp_path / "bin" / "flower-supernode"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "poll=$FLWR_SUPEREXEC_TASK_POLL_INTERVAL telemetry=$FLWR_TELEMETRY_ENABLED"\n')
    fake.chmod(0o755)
    script = str(provisioned.site_dir("hospital-a") / kits.START_SUPERNODE)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    out = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == "poll=0.1 telemetry=0"
    tuned = {**env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5"}  # the site's admin may tune it
    out = subprocess.run(["sh", script], env=tuned, capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == "poll=0.5 telemetry=0"


def test_site_kit_names_a_default_policy_that_loads_and_bounds_the_audit(provisioned: kits.Layout) -> None:
    kit = provisioned.site_dir("hospital-b")
    site = load_site_config(kit / kits.SITE_CONFIG)
    assert site.policy_file == str((kit / kits.SITE_POLICY).resolve())
    policy = load_site_policy(site.policy_file)
    # The code's defaults, the kit's budget, and the code that made the kit as the one approved app.
    assert policy == SitePolicy(max_epsilon=6.5, max_delta=1e-5, approved_apps=(running_app_hash(),))
    check_app(policy, running_app_hash())
    text = (kit / kits.SITE_POLICY).read_text()
    for name in (f.name for f in dataclasses.fields(SitePolicy)):  # every field written out, each with a comment
        line = next(line for line in text.splitlines() if line.startswith(f"{name}:"))
        assert "#" in line or name == "max_delta", line
    probe = AuditRequest(np.random.default_rng(0).uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32), [1e-6], [0.0])
    with pytest.raises(PolicyError, match="quantile level 0 rests on fewer than 5"):
        enforce_audit_policy(policy, probe, kit / "state")


def test_rerun_refuses_and_changes_nothing(provisioned: kits.Layout) -> None:
    before = {p: p.read_bytes() for p in provisioned.root.rglob("*") if p.is_file()}
    with pytest.raises(ProvisionError, match="already provisioned .* existing keys are never replaced"):
        provision(ProvisionRequest(out=provisioned.root, sites=SITES, server_host="fl.example.org", extra_hosts=("10.0.0.7",)))
    with pytest.raises(ProvisionError, match="To add hospital-c, run again with --force-new-sites"):
        provision(ProvisionRequest(out=provisioned.root, sites=(*SITES, "hospital-c"), server_host="fl.example.org",
                                   extra_hosts=("10.0.0.7",)))
    with pytest.raises(ProvisionError, match="was provisioned for fl.example.org"):
        provision(ProvisionRequest(out=provisioned.root, sites=("hospital-c",), server_host="other.example.org",
                                   add_sites=True))
    assert {p: p.read_bytes() for p in provisioned.root.rglob("*") if p.is_file()} == before


def test_force_new_sites_adds_only_the_new_site(provisioned: kits.Layout) -> None:
    before = {p: p.read_bytes() for p in provisioned.root.rglob("*") if p.is_file() and p.name != kits.MANIFEST}
    result = provision(ProvisionRequest(out=provisioned.root, sites=("hospital-a", "hospital-c"),
                                        server_host="fl.example.org", extra_hosts=("10.0.0.7",), add_sites=True))
    assert (result.created_sites, result.kept_sites, result.created_ca) == (["hospital-c"], ["hospital-a"], False)
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was rewritten"
    assert _mode(provisioned.site_key("hospital-c")) == 0o600
    assert provisioned.registered_key("hospital-c").is_file()
    manifest = json.loads(provisioned.manifest.read_text())
    assert sorted(manifest["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]
    with pytest.raises(ProvisionError, match="nothing to add"):
        provision(ProvisionRequest(out=provisioned.root, sites=("hospital-c",), server_host="fl.example.org",
                                   extra_hosts=("10.0.0.7",), add_sites=True))


def test_a_handed_over_kit_is_never_re_keyed(provisioned: kits.Layout) -> None:
    # the coordinator deleted its copy of hospital-a's key after handing the kit over
    provisioned.site_key("hospital-a").unlink()
    registered = provisioned.registered_key("hospital-a").read_bytes()
    result = provision(ProvisionRequest(out=provisioned.root, sites=("hospital-a", "hospital-c"),
                                        server_host="fl.example.org", extra_hosts=("10.0.0.7",), add_sites=True))
    assert result.created_sites == ["hospital-c"]
    assert not provisioned.site_key("hospital-a").exists()
    assert provisioned.registered_key("hospital-a").read_bytes() == registered


def test_a_folder_with_foreign_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ProvisionError, match="not empty and holds no provision.json"):
        provision(ProvisionRequest(out=tmp_path, sites=SITES, server_host="localhost"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"sites": ()}, "--sites: give at least one site"),
    ({"sites": ("Hospital_A",)}, "not a valid site name"),
    ({"sites": ("a", "a")}, "a given more than once"),
    ({"server_host": "https://fl.example.org"}, "--server-host: 'https://fl.example.org' is not a host name"),
    ({"server_host": "fl.example.org:9093"}, "no :port"),
    ({"extra_hosts": ("bad host",)}, "--extra-host"),
    ({"port": 0}, "--port: must be in"),
    ({"epsilon": 0.0}, "--epsilon/--delta: .*epsilon"),
])
def test_invalid_requests_name_the_option(tmp_path: Path, overrides: dict, message: str) -> None:
    req = {"out": tmp_path / "fed", "sites": SITES, "server_host": "localhost", **overrides}
    with pytest.raises(ProvisionError, match=message):
        provision(ProvisionRequest(**req))
    assert not (tmp_path / "fed").exists()


def test_cli_refusal_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["provision", "--sites", "hospital-a", "--server-host", "localhost", "--out", str(tmp_path / "fed")]
    assert main(args) == 0
    assert "register-sites.sh 127.0.0.1:9093 hospital-a" in capsys.readouterr().out
    assert main(args) != 0
    assert "already provisioned" in capsys.readouterr().err
