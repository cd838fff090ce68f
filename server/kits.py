"""The files a provisioned federation is made of: where each lives, what it holds, its mode.

``DIR/`` (the coordinator keeps it; ``ca/ca.key`` belongs offline)::

    provision.json                  server address, sites, public key fingerprints
    ca/ca.key, ca/ca.pem            the federation's CA (the key is in no kit)
    server/                         server kit: ca.pem, server.pem, server.key,
                                    site-keys/<site>.pub, start-superlink.sh, register-sites.sh
    sites/<site>/                   site kit: ca.pem, supernode.key, supernode.pub,
                                    site.yaml, site-policy.yaml, start-supernode.sh

A site kit holds only its own private key; the server kit holds public keys only. Private
keys are 0600 in 0700 folders. Every write is atomic, and a key file that already exists
is never written again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import keys
from client.policy import SitePolicy, running_app_hash
from common.config import SiteConfig, config_from_dict
from common.errors import FedsynthError
from common.fileio import make_dirs, write_bytes_atomic
from server.local_federation import SUPEREXEC_POLL_ENV

MANIFEST = "provision.json"
CA_CERT = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SITE_KEYS_DIR = "site-keys"
START_SUPERLINK = "start-superlink.sh"
REGISTER_SITES = "register-sites.sh"
NODE_KEY = "supernode.key"
NODE_PUB = "supernode.pub"
SITE_CONFIG = "site.yaml"
SITE_POLICY = "site-policy.yaml"
START_SUPERNODE = "start-supernode.sh"

SERVER_KIT_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, START_SUPERLINK, REGISTER_SITES)
SITE_KIT_FILES = (CA_CERT, NODE_KEY, NODE_PUB, SITE_CONFIG, SITE_POLICY, START_SUPERNODE)

# Where the images and manifests in deploy/ mount things; the site.yaml template points there.
CONTAINER_KIT = "/etc/fedsynth/kit"
CONTAINER_SCANS = "/data/scans"
CONTAINER_SITE_STATE = "/var/lib/fedsynth"

PRIVATE, PUBLIC, SCRIPT, FOLDER = 0o600, 0o644, 0o755, 0o700
# Flower's own variables: no phoning home, and no `uv sync` of app dependencies at run time
# (the SuperLink honours FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION; a SuperNode never
# installs unless started with --allow-runtime-dependency-installation).
FLOWER_QUIET_ENV = ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1")
# Every way a site starts its SuperNode (kit script, hospital image, compose, Kubernetes) sets
# these: the flower-superexec it starts looks for each message's task every 0.1 s, not every second.
SUPERNODE_ENV = tuple(f"{name}={value}" for name, value in SUPEREXEC_POLL_ENV.items())


class ProvisionError(FedsynthError):
    """Provisioning was refused: it would overwrite keys, or the request is invalid."""


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / CA_CERT

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    def site_dir(self, site: str) -> Path:
        return self.sites_dir / site

    def site_key(self, site: str) -> Path:
        return self.site_dir(site) / NODE_KEY

    def registered_key(self, site: str) -> Path:
        return self.server_dir / SITE_KEYS_DIR / f"{site}.pub"


@dataclass(frozen=True)
class KitSettings:
    superlink: str  # host:port the sites dial
    port: int
    epsilon: float
    delta: float
    # the fedsynth code that makes the kits: the default policy's one approved app
    app_hash: str = field(default_factory=running_app_hash)


def _write(path: Path, data: bytes, mode: int, overwrite: bool = False) -> None:
    """Atomic write; the temp file is created 0600, so a key is never readable by others, even briefly."""
    if path.exists() and not overwrite:
        raise ProvisionError(f"{path} already exists: refusing to overwrite it")
    _folder(path.parent)
    write_bytes_atomic(path, data)
    os.chmod(path, mode)


def _folder(path: Path) -> None:
    # Every level made here (sites/, server/site-keys/, missing parents of --out), not just
    # the last one: under umask 000 mkdir -p would leave the others 0777.
    for folder in make_dirs(path, FOLDER):
        os.chmod(folder, FOLDER)  # mkdir's mode is filtered by the umask


def write_ca(layout: Layout, key_pem: bytes, cert_pem: bytes) -> None:
    _folder(layout.root)
    _write(layout.ca_key, key_pem, PRIVATE)
    _write(layout.ca_cert, cert_pem, PUBLIC)


def write_server_tls(layout: Layout, ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> None:
    _write(layout.server_dir / CA_CERT, ca_pem, PUBLIC)
    _write(layout.server_dir / SERVER_KEY, key_pem, PRIVATE)
    _write(layout.server_dir / SERVER_CERT, cert_pem, PUBLIC)


def write_site_kit(layout: Layout, site: str, ca_pem: bytes, private_key: bytes, public_key: bytes,
                   settings: KitSettings) -> None:
    """One hospital's kit, plus its public key in the server kit for registration."""
    if layout.site_dir(site).exists():
        raise ProvisionError(f"{layout.site_dir(site)} already exists but {layout.manifest} does not list "
                             f"site '{site}': refusing to write a key into it")
    kit = layout.site_dir(site)
    _write(kit / NODE_KEY, private_key, PRIVATE)
    _write(kit / NODE_PUB, public_key, PUBLIC)
    _write(kit / CA_CERT, ca_pem, PUBLIC)
    _write(kit / SITE_CONFIG, render_site_config(site, settings).encode(), PUBLIC)
    _write(kit / SITE_POLICY, render_site_policy(site, settings).encode(), PUBLIC)
    _write(kit / START_SUPERNODE, render_start_supernode(settings).encode(), SCRIPT)
    _write(layout.registered_key(site), public_key, PUBLIC)


def write_server_scripts(layout: Layout, settings: KitSettings) -> None:
    """The scripts depend only on the address, which a re-run cannot change: written once."""
    for name, text in ((START_SUPERLINK, render_start_superlink(settings)),
                       (REGISTER_SITES, render_register_sites(settings))):
        if not (layout.server_dir / name).exists():
            _write(layout.server_dir / name, text.encode(), SCRIPT)


def write_manifest(layout: Layout, manifest: dict) -> None:
    _write(layout.manifest, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), PUBLIC, overwrite=True)


def render_site_config(site: str, settings: KitSettings) -> str:
    text = f"""\
# fedsynth site config of {site}: this hospital's own settings. It never leaves the site and
# the coordinator cannot change it. Review the privacy budget before joining a federation.
# Relative paths are relative to this file; the absolute ones below are where the hospital
# container (deploy/hospital.Dockerfile) mounts the scans and the state folder.
site_id: {site}                      # public name shown to the coordinator
data_dir: {CONTAINER_SCANS}                # <class>/ folders of PNG/JPEG/NIfTI, mounted read-only
labels_csv: ""                       # optional: CSV with columns file,label[,patient_id]
state_dir: {CONTAINER_SITE_STATE}         # privacy_ledger.json lives here: back it up, never delete it
# Before the first training, create the ledger once: fedsynth site init --config site.yaml
privacy_budget:                      # total over every DP step this site ever takes, all runs
  epsilon: {settings.epsilon!r}
  delta: {settings.delta:.1e}
allow_non_private: false             # refuse federations that ask for training without DP
policy_file: {SITE_POLICY}        # limits the coordinator cannot loosen: review it before joining
"""
    # The template must always load: a kit that fails on the hospital's first start is worse than no kit.
    config_from_dict(SiteConfig, yaml.safe_load(text), f"site.yaml template of {site}")
    return text


def render_site_policy(site: str, settings: KitSettings) -> str:
    """The kit's site policy: the code's own defaults, written out with what each one does.

    ``approved_apps`` names the code that made the kit, not ``any``: the site then runs the
    fedsynth version it was provisioned for and refuses changed code until its admin approves
    it, instead of running whatever app a coordinator sends. An empty list would refuse every
    task until the admin edits the file, which a kit must not do on its first start.
    """
    p = SitePolicy(max_epsilon=settings.epsilon, max_delta=settings.delta, approved_apps=(settings.app_hash,))
    rows = [
        (f"max_epsilon: {p.max_epsilon!r}", "never spend more privacy than this, whatever site.yaml or the server say"),
        (f"max_delta: {p.max_delta:.1e}", ""),
        (f"min_noise_multiplier: {p.min_noise_multiplier!r}", "refuse DP-SGD with less noise than this"),
        (f"max_grad_norm: {p.max_grad_norm!r}", "refuse a larger clipping norm"),
        (f"min_patients: {p.min_patients}", "refuse to train with fewer training patients than this"),
        (f"max_steps_per_round: {p.max_steps_per_round}", "refuse a round of more local steps (checked before any accounting)"),
        (f"max_epsilon_per_round: {p.max_epsilon_per_round!r}", "> 0: refuse a round that would add more epsilon; 0: no per-round cap"),
        (f"max_model_parameters: {p.max_model_parameters}", "refuse weights or a model with more values than this"),
        ("approved_apps:", "the only app code this site runs, for every task type"),
        (f"  - {settings.app_hash}", ""),
        ("  # ^ the fedsynth code `fedsynth provision` ran from. Replace it with the hash of the code you\n"
         "  #   reviewed (`fedsynth site app-hash PATH`); add a new version's hash once you reviewed it.\n"
         "  #   `any` would run whatever code the coordinator sends.", ""),
        ("# The memorisation audit (query tasks): the coordinator chooses the images it sends, so it can\n"
         "# ask about one chosen scan. These bound what an answer reveals; see \"What the memorisation\n"
         "# audit reveals\" in docs/site-admin.md.", ""),
        (f"allow_audit: {str(p.allow_audit).lower()}", "false: refuse every audit query"),
        (f"audit_min_images: {p.audit_min_images}", "distinct synthetic images per query, at least"),
        (f"audit_near_duplicate: {p.audit_near_duplicate!r}", "images closer than this to one another (Pearson distance) count once"),
        (f"audit_max_thresholds: {p.audit_max_thresholds}", "distance thresholds per query, at most"),
        (f"audit_max_threshold: {p.audit_max_threshold!r}", "every threshold in (0, this]: counts are about near-copies"),
        (f"audit_max_quantile_levels: {p.audit_max_quantile_levels}", "quantile levels per query, at most"),
        (f"audit_min_count: {p.audit_min_count}", "counts of fewer patients are sent as 0; each quantile needs this many images either side"),
        (f"audit_max_per_day: {p.audit_max_per_day}", "audit queries let through in any 24 hours, at most"),
    ]
    text = f"""\
# fedsynth site policy of {site}: limits the coordinator cannot loosen, checked before any of this
# site's data is read (docs/site-admin.md). Written by `fedsynth provision` with the defaults
# that also apply without a policy file; review every value, and approved_apps above all.
""" + "".join(f"{value:<30} # {comment}\n" if comment else f"{value}\n" for value, comment in rows)
    # Like the site config: the template must load, with exactly the values shown.
    loaded = config_from_dict(SitePolicy, yaml.safe_load(text), f"{SITE_POLICY} template of {site}")
    if loaded != p:
        raise ProvisionError(f"{SITE_POLICY} template of {site} does not load as written; this is a bug")
    return text


_PREAMBLE = """\
#!/bin/sh
# Generated by `fedsynth provision`. {purpose}
set -eu
KIT="$(cd "$(dirname "$0")" && pwd)"
export {env}
"""


def render_start_superlink(settings: KitSettings) -> str:
    preamble = _PREAMBLE.format(purpose="Starts the SuperLink: TLS on one port, only registered SuperNodes.",
                                env=" ".join(FLOWER_QUIET_ENV))
    return preamble + f"""\
# FEDSYNTH_BIND (default 0.0.0.0) and FEDSYNTH_PORT (default {settings.port}): the one port that
#   serves the hospitals (Fleet API) and the coordinator's flwr CLI (Control API).
# FEDSYNTH_SERVER_STATE (default $KIT/state): the SuperLink database. It holds the registered
#   site keys: on throwaway storage every site would have to be registered again.
# Extra arguments go to flower-superlink, e.g. --health-server-address 0.0.0.0:9098
STATE="${{FEDSYNTH_SERVER_STATE:-$KIT/state}}"
mkdir -p "$STATE"
exec flower-superlink \\
    --ssl-ca-certfile "$KIT/{CA_CERT}" --ssl-certfile "$KIT/{SERVER_CERT}" --ssl-keyfile "$KIT/{SERVER_KEY}" \\
    --enable-supernode-auth --isolation subprocess --disable-runtime-dependency-installation \\
    --database "$STATE/superlink.db" \\
    --host "${{FEDSYNTH_BIND:-0.0.0.0}}" --port "${{FEDSYNTH_PORT:-{settings.port}}}" "$@"
"""


def render_register_sites(settings: KitSettings) -> str:
    preamble = _PREAMBLE.format(purpose="Registers site public keys with the running SuperLink.",
                                env=" ".join(FLOWER_QUIET_ENV))
    return preamble + f"""\
# Usage: register-sites.sh [SUPERLINK_ADDRESS [SITE ...]]
#   SUPERLINK_ADDRESS defaults to 127.0.0.1:{settings.port} (run it on the server host); SITE
#   defaults to every key in site-keys/. A key is registered once; `flwr supernode list` shows them.
ADDRESS="${{1:-127.0.0.1:{settings.port}}}"
[ $# -gt 0 ] && shift
FLWR_HOME="$(mktemp -d)"
export FLWR_HOME
trap 'rm -rf "$FLWR_HOME"' EXIT
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fedsynth"

[superlink.fedsynth]
address = "$ADDRESS"
root-certificates = "$KIT/{CA_CERT}"
EOF
if [ $# -eq 0 ]; then
    for key in "$KIT/{SITE_KEYS_DIR}"/*.pub; do set -- "$@" "$(basename "$key" .pub)"; done
fi
status=0
for site in "$@"; do
    key="$KIT/{SITE_KEYS_DIR}/$site.pub"
    if [ ! -f "$key" ]; then
        echo "register-sites: no public key for site '$site' ($key)" >&2
        status=1
    elif ! flwr supernode register "$key" fedsynth --name "$site"; then
        echo "register-sites: site '$site' was not registered (already registered? see flwr supernode list)" >&2
        status=1
    fi
done
exit $status
"""


def render_start_supernode(settings: KitSettings) -> str:
    preamble = _PREAMBLE.format(purpose="Starts this hospital's SuperNode (one outbound TLS connection).",
                                env=" ".join(FLOWER_QUIET_ENV[:2]))
    # Defaults only: a value already in the environment (the site admin's) wins.
    defaults = "".join(f'export {name}="${{{name}:-{value}}}"\n' for name, value in SUPEREXEC_POLL_ENV.items())
    return preamble + f"""\
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL: seconds between the SuperExec's looks for a new task;
#   Flower's default of 1 s delays the start of every message.
{defaults}# FEDSYNTH_SUPERLINK (default {settings.superlink}): the coordinator's SuperLink, host:port.
# FEDSYNTH_SITE_CONFIG (default $KIT/{SITE_CONFIG}): this site's config (data, state, budget).
# FEDSYNTH_NUM_THREADS (optional): torch threads per training process.
# Once, before the first start: fedsynth site init --config "$KIT/{SITE_CONFIG}" (the privacy ledger).
# Extra arguments go to flower-supernode, e.g. --health-server-address 127.0.0.1:9098
SITE_CONFIG="${{FEDSYNTH_SITE_CONFIG:-$KIT/{SITE_CONFIG}}}"
NODE_CONFIG="{keys.NODE_SITE_CONFIG}=\\"$SITE_CONFIG\\""
if [ -n "${{FEDSYNTH_NUM_THREADS:-}}" ]; then
    NODE_CONFIG="$NODE_CONFIG {keys.NODE_NUM_THREADS}=$FEDSYNTH_NUM_THREADS"
fi
exec flower-supernode \\
    --superlink "${{FEDSYNTH_SUPERLINK:-{settings.superlink}}}" --root-certificates "$KIT/{CA_CERT}" \\
    --auth-supernode-private-key "$KIT/{NODE_KEY}" --isolation subprocess \\
    --node-config "$NODE_CONFIG" "$@"
"""
