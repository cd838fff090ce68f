"""The hospital's policy: limits and approved apps that the coordinator cannot loosen.

The policy file is named by the site config (``policy_file``), which the SuperNode's node
config names in turn, so only the hospital can change it. Every task is checked against it
*before* any data is touched or any privacy budget is spent:

* every task (train, evaluate, query): the app's code must be one the hospital approved
  (:func:`check_app`, by :func:`app_code_hash`);
* train (:func:`enforce_policy`): the requested noise multiplier may not be below the
  floor, nor the clipping norm above the ceiling; the site must hold at least
  ``min_patients`` training patients; the privacy ceiling is the tightest of the site
  budget, the policy and the federation's own per-site cap: the server can lower it,
  never raise it; a round may take at most ``max_steps_per_round`` steps (checked before
  any accountant runs) and add at most ``max_epsilon_per_round``;
* train and evaluate (:func:`check_model_size`): the weights sent and the model described
  may not exceed ``max_model_parameters``;
* query, the memorisation audit (``client/audit_policy.py``): the server chooses the
  images it sends, so it could use the audit as a membership oracle; the ``audit_*``
  fields switch it off, demand enough *distinct* images (near-copies count once), bound
  the thresholds and quantile levels per query, suppress counts of fewer than
  ``audit_min_count`` patients and limit the queries answered per 24 h. Without a policy
  file the same defaults apply.

Example policy file::

    max_epsilon: 8.0
    max_delta: 1.0e-5
    min_noise_multiplier: 0.8
    max_grad_norm: 1.0
    min_patients: 50
    approved_apps:
      - 3f1c...e9   # output of `fedsynth site app-hash PATH` on the reviewed code
    allow_audit: true           # false: every memorisation-audit query is refused
    audit_min_images: 20        # distinct synthetic images per query, at least
    audit_near_duplicate: 0.05  # images closer than this (Pearson distance) count as one
    audit_max_thresholds: 8
    audit_max_threshold: 0.1    # thresholds in (0, this]: counts are about near-copies
    audit_max_quantile_levels: 8
    audit_min_count: 5          # counts below this are sent as 0; quantiles need this many each side
    audit_max_per_day: 10       # queries let through in any 24 h, from the site's audit quota file
    max_steps_per_round: 5000   # these three apply, with these defaults, without a policy file too
    max_epsilon_per_round: 0.0  # > 0: the most epsilon one round may add
    max_model_parameters: 100000000
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common import audit_protocol
from common.config import FedsynthConfig, PrivacyBudget, SiteConfig, config_from_dict, read_yaml, require
from common.errors import PolicyError

ANY_APP = "any"
# Without a policy file these still bound a task: a server asking for 100,000 steps or a
# huge model must not exhaust the site's memory (the accountant, the UNet) or hang it.
DEFAULT_MAX_STEPS_PER_ROUND = 5000
HARD_MAX_STEPS_PER_ROUND = 100_000
DEFAULT_MAX_MODEL_PARAMETERS = 100_000_000
CODE_PACKAGES = ("common", "client", "server")


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float
    max_delta: float
    min_noise_multiplier: float = 0.5
    max_grad_norm: float = 10.0
    min_patients: int = 1
    approved_apps: tuple[str, ...] = ()
    allow_audit: bool = True
    audit_min_images: int = 20
    audit_max_thresholds: int = 8
    audit_max_quantile_levels: int = 8
    audit_max_per_day: int = 10
    audit_near_duplicate: float = 0.05
    audit_max_threshold: float = 0.1
    audit_min_count: int = audit_protocol.DEFAULT_MIN_COUNT
    # Bounds on what one task may cost the site, applied with or without a policy file.
    max_steps_per_round: int = DEFAULT_MAX_STEPS_PER_ROUND
    max_epsilon_per_round: float = 0.0  # 0: no per-round cap beyond the total budget
    max_model_parameters: int = DEFAULT_MAX_MODEL_PARAMETERS

    def __post_init__(self) -> None:
        require(0 < self.max_epsilon <= 100, "max_epsilon", f"must be in (0, 100], got {self.max_epsilon}")
        require(0 < self.max_delta < 1e-2, "max_delta", f"must be in (0, 0.01), got {self.max_delta}")
        require(self.min_noise_multiplier >= 0, "min_noise_multiplier", f"must be >= 0, got {self.min_noise_multiplier}")
        require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        require(self.min_patients >= 1, "min_patients", f"must be >= 1, got {self.min_patients}")
        require(all(a == ANY_APP or (len(a) == 64 and all(c in "0123456789abcdef" for c in a)) for a in self.approved_apps),
                 "approved_apps", f"entries must be 64 lower-case hex digits (sha256) or '{ANY_APP}'")
        # The protocol's own minimum is the floor: a policy may only be stricter than no policy.
        require(self.audit_min_images >= audit_protocol.MIN_SYNTHETIC_IMAGES, "audit_min_images",
                f"must be >= {audit_protocol.MIN_SYNTHETIC_IMAGES}, got {self.audit_min_images}")
        require(self.audit_max_thresholds >= 1, "audit_max_thresholds", f"must be >= 1, got {self.audit_max_thresholds}")
        require(self.audit_max_quantile_levels >= 1, "audit_max_quantile_levels",
                f"must be >= 1, got {self.audit_max_quantile_levels}")
        require(self.audit_max_per_day >= 1, "audit_max_per_day",
                f"must be >= 1 (use allow_audit: false to refuse every audit), got {self.audit_max_per_day}")
        # 0.5 (r < 0.5) would merge images that merely look alike; 0 would merge nothing, not even copies.
        require(0 < self.audit_near_duplicate <= 0.5, "audit_near_duplicate",
                f"must be in (0, 0.5], got {self.audit_near_duplicate}")
        require(0 < self.audit_max_threshold <= 2, "audit_max_threshold",
                f"must be in (0, 2] (a Pearson distance), got {self.audit_max_threshold}")
        require(self.audit_min_count >= 1, "audit_min_count",
                f"must be >= 1 (1 reports every count as it is), got {self.audit_min_count}")
        require(1 <= self.max_steps_per_round <= HARD_MAX_STEPS_PER_ROUND, "max_steps_per_round",
                f"must be in [1, {HARD_MAX_STEPS_PER_ROUND}], got {self.max_steps_per_round}")
        require(self.max_epsilon_per_round >= 0, "max_epsilon_per_round",
                f"must be >= 0 (0: no per-round cap), got {self.max_epsilon_per_round}")
        require(self.max_model_parameters >= 1, "max_model_parameters", f"must be >= 1, got {self.max_model_parameters}")


def load_site_policy(path: str | Path) -> SitePolicy:
    return config_from_dict(SitePolicy, read_yaml(Path(path)), str(path))


def _code_files_from_dir(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel or "/tests/" in f"/{rel}":
                continue
            files[rel] = path.read_bytes()
    return files


def _code_files_from_fab(fab: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(fab.read_bytes())) as archive:
        return {name: archive.read(name) for name in sorted(archive.namelist())
                if name.endswith(".py") and name.split("/", 1)[0] in CODE_PACKAGES and "__pycache__" not in name}


def hash_code_files(files: dict[str, bytes]) -> str:
    """sha256 over (path, sha256 of content) of every code file, in path order."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(files[rel]).digest())
    return digest.hexdigest()


def app_code_hash(path: str | Path) -> str:
    """The hash a site approves: of the Python code in ``common/``, ``client/`` and ``server/``.

    ``path`` is a checkout, an unpacked app bundle or a ``.fab`` file; all three give the same
    hash for the same code, so an admin can hash what they reviewed and compare.
    """
    path = Path(path)
    files = _code_files_from_fab(path) if path.is_file() else _code_files_from_dir(path)
    if not files:
        raise PolicyError(f"{path}: no fedsynth code found (expected {', '.join(CODE_PACKAGES)} packages)")
    return hash_code_files(files)


@lru_cache(maxsize=1)
def running_app_hash() -> str:
    """Hash of the code this ClientApp is running (the app bundle Flower unpacked)."""
    return app_code_hash(Path(__file__).resolve().parents[1])


def privacy_ceiling(site: SiteConfig, policy: SitePolicy | None, cfg: FedsynthConfig) -> PrivacyBudget:
    """The tightest of the site's budget, its policy and the federation's cap."""
    epsilon, delta = site.privacy_budget.epsilon, site.privacy_budget.delta
    if policy is not None:
        epsilon, delta = min(epsilon, policy.max_epsilon), min(delta, policy.max_delta)
    if cfg.privacy.max_epsilon_per_site > 0:
        epsilon = min(epsilon, cfg.privacy.max_epsilon_per_site)
    return PrivacyBudget(epsilon=epsilon, delta=delta)


def refuse(reason: str) -> PolicyError:
    """A refusal whose reason may go to the server: callers never put a path or patient id in it."""
    return PolicyError(f"site policy refuses the task: {reason}", public=f"site policy refuses the task: {reason}")


def check_app(policy: SitePolicy | None, app_hash: str) -> None:
    """Raise :class:`PolicyError` unless the running code is approved; applies to every task type."""
    if policy is None:
        return
    if ANY_APP not in policy.approved_apps and app_hash not in policy.approved_apps:
        raise refuse(f"app code {app_hash[:12]}... is not among the {len(policy.approved_apps)} approved app(s)")


def enforce_policy(policy: SitePolicy | None, cfg: FedsynthConfig, app_hash: str, num_train_patients: int) -> None:
    """Raise :class:`PolicyError` if the train task would loosen the site's policy.

    The step bound applies without a policy file too, and is checked before any accountant runs.
    """
    check_app(policy, app_hash)
    max_steps = policy.max_steps_per_round if policy else DEFAULT_MAX_STEPS_PER_ROUND
    if cfg.training.local_steps > max_steps:
        raise refuse(f"{cfg.training.local_steps} local steps in one round, more than the site's maximum {max_steps}")
    if policy is None:
        return
    if not cfg.privacy.enabled:
        raise refuse("training without DP is not allowed by the policy")
    if cfg.privacy.noise_multiplier < policy.min_noise_multiplier:
        raise refuse(f"noise multiplier {cfg.privacy.noise_multiplier} is below the policy's minimum {policy.min_noise_multiplier}")
    if cfg.privacy.max_grad_norm > policy.max_grad_norm:
        raise refuse(f"clipping norm {cfg.privacy.max_grad_norm} is above the policy's maximum {policy.max_grad_norm}")
    if num_train_patients < policy.min_patients:
        raise refuse(f"{num_train_patients} training patients, fewer than the policy's minimum {policy.min_patients}")


def model_parameters(cfg: FedsynthConfig) -> int:
    """Trainable parameters of the UNet ``cfg`` describes, measured without allocating them.

    The whole model a site builds, whatever ``training.trainable`` freezes: this bounds memory.

    Raises:
        PolicyError: the config describes a model beyond what fedsynth builds at all.
    """
    import math

    from common.model import trainable_shapes

    try:
        return sum(math.prod(shape) for shape in trainable_shapes(cfg.model).values())
    except ValueError as err:  # names the setting, never a site detail
        raise refuse(str(err)) from None


def check_model_size(policy: SitePolicy | None, cfg: FedsynthConfig, received_values: int) -> None:
    """Raise :class:`PolicyError` if the weights sent, or the model the config describes, are too large.

    ``received_values`` is counted from the arrays' shapes before they are unpacked.
    """
    limit = policy.max_model_parameters if policy else DEFAULT_MAX_MODEL_PARAMETERS
    if received_values > limit:
        raise refuse(f"the server sent {received_values:,} weight values, more than the site's maximum {limit:,}")
    described = model_parameters(cfg)
    if described > limit:
        raise refuse(f"the federation's model has {described:,} parameters, more than the site's maximum {limit:,}")
