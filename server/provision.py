"""Provision a federation: a CA, the SuperLink's TLS certificate and one SuperNode key per site.

Flower 1.42 uses two independent mechanisms, and this module makes the material for both:

* TLS (server side only): the SuperLink presents a certificate signed by our CA; every
  SuperNode and the ``flwr`` CLI verify it with ``ca.pem``. A node that trusts another CA
  refuses the handshake.
* SuperNode authentication (``--enable-supernode-auth``): each site signs its requests with
  an ECDSA key. ``flower-supernode`` reads the private key with ``load_ssh_private_key``
  (an OpenSSH private key, *not* a PKCS#8/SEC1 PEM) and ``flwr supernode register`` reads
  the public key with ``load_ssh_public_key`` (``ecdsa-sha2-nistp384 AAAA...``). Only
  registered public keys are admitted.

Key material is created here, written by :mod:`server.kits`, and never overwritten: a
second run adds sites only when asked to and leaves every existing key alone.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import PrivacyBudget
from common.errors import ConfigError
from server import kits
from server.kits import ProvisionError

# P-384 is what Flower itself generates for SuperNodes; any NIST curve would be accepted.
CURVE = ec.SECP384R1
DEFAULT_PORT = 9093
DEFAULT_VALID_DAYS = 825
_SITE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class ProvisionRequest:
    out: Path
    sites: tuple[str, ...]
    server_host: str
    extra_hosts: tuple[str, ...] = ()
    port: int = DEFAULT_PORT
    epsilon: float = 8.0
    delta: float = 1e-5
    add_sites: bool = False
    valid_days: int = DEFAULT_VALID_DAYS


@dataclass
class ProvisionResult:
    layout: kits.Layout
    created_sites: list[str] = field(default_factory=list)
    kept_sites: list[str] = field(default_factory=list)
    created_ca: bool = False


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode key pair in the formats Flower 1.42 reads (both OpenSSH)."""

    private_openssh: bytes
    public_openssh: bytes

    @property
    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(self.public_openssh.strip()).hexdigest()


def generate_node_key() -> NodeKey:
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKey(private, public + b"\n")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate_ca(name: str, valid_days: int) -> tuple[bytes, bytes]:
    """A self-signed CA that may sign server certificates only (path length 0): (key PEM, cert PEM)."""
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynth"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def server_hosts(host: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Every name the server certificate is valid for: the public host, extras, then loopback."""
    names: list[str] = []
    for name in (host, *extra, "localhost", "127.0.0.1"):
        if name not in names:
            names.append(name)
    return names


def issue_server_cert(ca_key_pem: bytes, ca_cert_pem: bytes, hosts: list[str], valid_days: int) -> tuple[bytes, bytes]:
    """A TLS server certificate for ``hosts`` signed by the CA: (key PEM, cert PEM)."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ProvisionError("the CA key is not an EC key; was ca/ca.key replaced?")
    key = ec.generate_private_key(CURVE())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynth"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def validate_request(req: ProvisionRequest) -> None:
    """Reject bad names before any key is made; messages name the option and the value."""
    if not req.sites:
        raise ProvisionError("--sites: give at least one site name, e.g. --sites hospital-a,hospital-b")
    for site in req.sites:
        if not _SITE_NAME.match(site):
            raise ProvisionError(f"--sites: {site!r} is not a valid site name: use lower-case letters, digits and "
                                 "'-' (1 to 63 characters, starting and ending with a letter or digit), as it names "
                                 "folders, containers and Kubernetes objects")
    duplicates = sorted({s for s in req.sites if req.sites.count(s) > 1})
    if duplicates:
        raise ProvisionError(f"--sites: {', '.join(duplicates)} given more than once")
    for option, host in [("--server-host", req.server_host), *(("--extra-host", h) for h in req.extra_hosts)]:
        if not _valid_host(host):
            raise ProvisionError(f"{option}: {host!r} is not a host name or IP address (give the host only: "
                                 "no scheme such as https://, no :port; the port is --port)")
    if not 1 <= req.port <= 65535:
        raise ProvisionError(f"--port: must be in [1, 65535], got {req.port}")
    if req.valid_days < 1:
        raise ProvisionError(f"--valid-days: must be >= 1, got {req.valid_days}")
    try:
        PrivacyBudget(epsilon=req.epsilon, delta=req.delta)
    except Exception as err:  # the schema's own check, so the template always loads
        raise ProvisionError(f"--epsilon/--delta: {err}") from None


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(host))


def provision(req: ProvisionRequest) -> ProvisionResult:
    """Create the CA, the server kit and one kit per site under ``req.out``; never overwrite a key."""
    validate_request(req)
    layout = kits.Layout(req.out)
    manifest = _read_manifest(layout)
    hosts = server_hosts(req.server_host, req.extra_hosts)
    if manifest is None:
        _refuse_foreign_folder(layout)
        existing: dict[str, dict] = {}
    else:
        existing = _check_rerun(req, manifest, hosts, layout)

    result = ProvisionResult(layout)
    if manifest is None:
        ca_key, ca_cert = generate_ca(f"fedsynth federation CA ({req.server_host})", req.valid_days)
        kits.write_ca(layout, ca_key, ca_cert)
        server_key, server_cert = issue_server_cert(ca_key, ca_cert, hosts, req.valid_days)
        kits.write_server_tls(layout, ca_cert, server_key, server_cert)
        result.created_ca = True
        manifest = {"format": "fedsynth-provision", "version": 1, "server_host": req.server_host,
                    "server_hosts": hosts, "port": req.port, "created": time.time(), "sites": {}}
    settings = kits.KitSettings(superlink=f"{req.server_host}:{req.port}", port=req.port,
                                epsilon=req.epsilon, delta=req.delta)
    ca_cert = layout.ca_cert.read_bytes()
    for site in req.sites:
        if site in existing:
            result.kept_sites.append(site)
            continue
        key = generate_node_key()
        kits.write_site_kit(layout, site, ca_cert, key.private_openssh, key.public_openssh, settings)
        manifest["sites"][site] = {"public_key_sha256": key.fingerprint, "created": time.time()}
        result.created_sites.append(site)
    kits.write_server_scripts(layout, settings)
    kits.write_manifest(layout, manifest)
    return result


def _read_manifest(layout: kits.Layout) -> dict | None:
    if not layout.manifest.exists():
        return None
    try:
        manifest = json.loads(layout.manifest.read_text())
        if manifest.get("format") != "fedsynth-provision" or not isinstance(manifest.get("sites"), dict):
            raise ValueError("not a fedsynth provision manifest")
        return manifest
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{layout.manifest}: unreadable provision manifest ({err}); refusing to touch {layout.root}") from None


def _refuse_foreign_folder(layout: kits.Layout) -> None:
    if layout.root.exists() and any(layout.root.iterdir()):
        raise ProvisionError(f"{layout.root} is not empty and holds no {layout.manifest.name}: refusing to write keys "
                             "into it. Choose a new --out folder (or remove a half-finished one).")


def _check_rerun(req: ProvisionRequest, manifest: dict, hosts: list[str], layout: kits.Layout) -> dict[str, dict]:
    existing = dict(manifest["sites"])
    if manifest.get("server_hosts") != hosts or int(manifest.get("port", -1)) != req.port:
        raise ProvisionError(
            f"{layout.root} was provisioned for {', '.join(manifest.get('server_hosts', []))} port {manifest.get('port')}, "
            f"not {', '.join(hosts)} port {req.port}: the server certificate and every site's start script would "
            "change. Provision a new folder for a new server address.")
    new = [s for s in req.sites if s not in existing]
    if not req.add_sites:
        hint = (f"To add {', '.join(new)}, run again with --force-new-sites." if new
                else "Every requested site already has a kit.")
        raise ProvisionError(f"{layout.root} is already provisioned (sites: {', '.join(sorted(existing))}); nothing "
                             f"was changed, existing keys are never replaced. {hint}")
    if not new:
        raise ProvisionError(f"--force-new-sites: every requested site ({', '.join(req.sites)}) already has a kit "
                             f"in {layout.sites_dir}; nothing to add. Existing keys are never replaced.")
    strays = [s for s in new if layout.site_dir(s).exists()]
    if strays:
        raise ProvisionError(f"{', '.join(layout.site_dir(s).as_posix() for s in strays)} already exist(s) but "
                             f"{layout.manifest.name} does not list them: refusing to write keys there")
    # A handed-over kit may be gone from here (its private key is the hospital's alone): sites listed
    # in the manifest are kept as they are, never re-keyed.
    return existing
