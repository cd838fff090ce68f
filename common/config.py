"""Typed, validated configuration: the federation's settings and each hospital's own.

YAML is parsed once at the edge into frozen dataclasses; everything below works with
typed objects. Unknown keys, wrong types and impossible values are rejected with the
file, the dotted key and the reason.

Two kinds of file:

* a *federation* config (the coordinator's): model, diffusion, training, privacy,
  data and federation settings; it travels to the sites inside each train message;
* a *site* config (the hospital's): its data and state folders and its own privacy
  budget. It never leaves the site and the server cannot change it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import ConfigError
from common.trainable import ALL as TRAIN_ALL
from common.trainable import spec_problem as trainable_problem

T = TypeVar("T")

SCHEDULES = ("linear_beta", "scaled_linear_beta", "cosine")
ACCOUNTANTS = ("prv", "rdp")
# "fedsynth": per-sample gradients from client/grad_sample.py; "hooks"/"functorch": Opacus' own modes.
GRAD_SAMPLE_MODES = ("fedsynth", "hooks", "functorch")
# "auto": bfloat16 autocast when training on a GPU that supports it, full precision otherwise (CPU).
MIXED_PRECISION = ("auto", "off", "bf16")
# Each draw is one more forward and backward row per patient: the step's cost and activation
# memory grow K-fold, and past a few dozen draws the gradient variance left is the DP noise's.
MAX_NOISE_MULTIPLICITY = 64
# dtype of the weights a site sends back; the server averages in float32 whatever arrives.
TRANSFER_DTYPES = ("float32", "float16")
# How the server turns the sites' weighted average into the next global weights: Flower's
# strategies of the same names (flwr.serverapp.strategy); fedavg takes the average as it is.
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
_FEDOPT = ("fedadam", "fedyogi", "fedadagrad")  # Flower's FedOpt family: eta, tau (and beta_1/beta_2)


class _Invalid(Exception):
    """Raised inside ``__post_init__``; the loader adds the file and key prefix."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def require(condition: bool, key: str, reason: str) -> None:
    if not condition:
        raise _Invalid(key, reason)


@dataclass(frozen=True)
class DataConfig:
    """How a site turns its files into training slices (all sites must agree)."""

    image_size: int = 32
    slice_axis: int = 2
    min_foreground: float = 0.05
    pixel_spacing_mm: float = 1.0

    def __post_init__(self) -> None:
        require(8 <= self.image_size <= 512, "image_size", f"must be in [8, 512], got {self.image_size}")
        require(self.slice_axis in (0, 1, 2), "slice_axis", f"must be 0, 1 or 2 (RAS axis), got {self.slice_axis}")
        require(0.0 <= self.min_foreground < 1.0, "min_foreground", f"must be in [0, 1), got {self.min_foreground}")
        require(self.pixel_spacing_mm > 0, "pixel_spacing_mm", f"must be > 0, got {self.pixel_spacing_mm}")


@dataclass(frozen=True)
class ModelConfig:
    """Arguments of MONAI's ``DiffusionModelUNet`` (2D, one channel) plus the class names."""

    classes: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
    channels: tuple[int, ...] = (16, 32, 32)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    num_head_channels: int = 8
    # A checkpoint (e.g. from `fedsynth pretrain`) whose weights a fresh run starts from instead of a
    # seeded random init; relative to the config file. Its model settings and data.image_size must match.
    init_checkpoint: str = ""

    def __post_init__(self) -> None:
        require(len(self.classes) >= 1, "classes", "needs at least one class name")
        require(len(set(self.classes)) == len(self.classes), "classes", f"names must be unique, got {list(self.classes)}")
        require(all(c.strip() == c and c for c in self.classes), "classes", "names must be non-empty without surrounding spaces")
        require(len(self.channels) >= 1, "channels", "needs at least one level")
        require(all(c > 0 for c in self.channels), "channels", f"must be positive, got {list(self.channels)}")
        require(len(self.attention_levels) == len(self.channels), "attention_levels",
                 f"needs one entry per level of channels ({len(self.channels)}), got {len(self.attention_levels)}")
        require(self.norm_num_groups > 0, "norm_num_groups", f"must be > 0, got {self.norm_num_groups}")
        require(all(c % self.norm_num_groups == 0 for c in self.channels), "channels",
                 f"every entry must be divisible by norm_num_groups ({self.norm_num_groups}), got {list(self.channels)}")
        require(self.num_res_blocks >= 1, "num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        require(self.num_head_channels > 0 and all(c % self.num_head_channels == 0 for c in self.channels),
                 "num_head_channels", f"must divide every channel count {list(self.channels)}, got {self.num_head_channels}")

    @property
    def null_class(self) -> int:
        """Index of the extra 'no class' embedding used for classifier-free guidance."""
        return len(self.classes)

    def architecture(self) -> ModelConfig:
        """These settings without ``init_checkpoint``: what a model's weights must fit, whatever they start from."""
        return dataclasses.replace(self, init_checkpoint="")


@dataclass(frozen=True)
class DiffusionConfig:
    """DDPM training schedule (MONAI ``DDPMScheduler`` arguments)."""

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2

    def __post_init__(self) -> None:
        require(10 <= self.num_train_timesteps <= 10000, "num_train_timesteps",
                 f"must be in [10, 10000], got {self.num_train_timesteps}")
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        require(0 < self.beta_start < self.beta_end < 1, "beta_end",
                 f"need 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}")


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at each site, per round."""

    local_steps: int = 20
    batch_size: int = 16
    learning_rate: float = 2e-4
    label_dropout: float = 0.1
    seed: int = 0
    mixed_precision: str = "auto"
    # Each sampled patient's loss is the mean over this many (timestep, noise) draws of its slice,
    # taken before clipping (Dockhorn et al. 2022): less gradient variance, same privacy cost.
    noise_multiplicity: int = 1
    # AdamW's moments stay in the site's state folder from round to round of a run (never sent).
    keep_optimizer_state: bool = True
    # Linear learning-rate warm-up over the site's first optimiser steps of a run, then constant.
    warmup_steps: int = 0
    # Which parameters train under DP and travel: "all", "efficient" or a list of glob patterns over
    # parameter names (common/trainable.py); each pattern is checked against the model where it is built.
    trainable: str | tuple[str, ...] = TRAIN_ALL

    def __post_init__(self) -> None:
        require(self.mixed_precision in MIXED_PRECISION, "mixed_precision",
                 f"must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        require(self.local_steps >= 1, "local_steps", f"must be >= 1, got {self.local_steps}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(0 < self.learning_rate < 1, "learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        require(0 <= self.label_dropout < 1, "label_dropout", f"must be in [0, 1), got {self.label_dropout}")
        require(1 <= self.noise_multiplicity <= MAX_NOISE_MULTIPLICITY, "noise_multiplicity",
                f"must be in [1, {MAX_NOISE_MULTIPLICITY}], got {self.noise_multiplicity}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        problem = trainable_problem(self.trainable)
        require(problem is None, "trainable", str(problem))


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings requested by the coordinator; each site checks them against its budget."""

    enabled: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    # A federation-wide cap each site applies on top of its own budget: it can only tighten
    # a site's limits, never loosen them. 0 means no cap.
    max_epsilon_per_site: float = 0.0
    grad_sample_mode: str = "fedsynth"

    def __post_init__(self) -> None:
        require(self.grad_sample_mode in GRAD_SAMPLE_MODES, "grad_sample_mode",
                 f"must be one of {list(GRAD_SAMPLE_MODES)}, got {self.grad_sample_mode!r}")
        require(self.max_epsilon_per_site >= 0, "max_epsilon_per_site", f"must be >= 0, got {self.max_epsilon_per_site}")
        require(self.noise_multiplier > 0, "noise_multiplier", f"must be > 0, got {self.noise_multiplier}")
        require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        require(self.accountant in ACCOUNTANTS, "accountant", f"must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, quorum and where the coordinator writes its outputs."""

    output_dir: str
    num_rounds: int = 3
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    fraction_train: float = 1.0
    round_timeout_s: float = 3600.0
    final_model: str = ""
    resume: bool = False
    # Fewest accepted site updates for a round to count; below it the run stops, last checkpoint intact.
    quorum: int = 1
    # How long a round waits for min_available_nodes to be connected before the run stops.
    node_wait_timeout_s: float = 600.0
    # Largest L2 norm of a site's update (its weights minus the global weights); 0 = no bound.
    max_update_norm: float = 0.0
    # dtype of the weights each site sends back: float16 halves the upload; averaging stays float32.
    transfer_dtype: str = "float32"
    # A separate evaluate phase (the global model on every site's held-out patients) every N rounds;
    # 0 = never. Each train reply already carries the validation loss of the site's trained model,
    # and each phase costs every site a message (in deployment a fresh ClientApp process).
    evaluate_every: int = 0
    # Server optimiser and its options, named after the arguments of Flower's classes. Each option
    # defaults to Flower's default; setting one the chosen optimiser does not take is an error.
    server_optimizer: str = "fedavg"
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.0  # fedavgm
    eta: float = 0.0  # fedadam, fedyogi, fedadagrad: server learning rate; 0 = Flower's default (0.1; fedyogi 0.01)
    beta_1: float = 0.9  # fedadam, fedyogi
    beta_2: float = 0.99  # fedadam, fedyogi
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad
    # Exponential moving average of the global weights over rounds (bias-corrected), kept in every
    # checkpoint and sampled from by default; sites always train from the raw global weights. 0 = off.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        self._check_server_optimizer()
        require(self.transfer_dtype in TRANSFER_DTYPES, "transfer_dtype",
                 f"must be one of {list(TRANSFER_DTYPES)}, got {self.transfer_dtype!r}")
        require(bool(self.output_dir), "output_dir", "must be set")
        require(self.num_rounds >= 1, "num_rounds", f"must be >= 1, got {self.num_rounds}")
        require(self.min_train_nodes >= 1, "min_train_nodes", f"must be >= 1, got {self.min_train_nodes}")
        require(self.min_available_nodes >= self.min_train_nodes, "min_available_nodes",
                 f"must be >= min_train_nodes ({self.min_train_nodes}), got {self.min_available_nodes}")
        require(0 < self.fraction_train <= 1, "fraction_train", f"must be in (0, 1], got {self.fraction_train}")
        require(self.round_timeout_s > 0, "round_timeout_s", f"must be > 0, got {self.round_timeout_s}")
        require(1 <= self.quorum <= self.min_train_nodes, "quorum",
                 f"must be in [1, min_train_nodes ({self.min_train_nodes})], got {self.quorum}")
        require(self.node_wait_timeout_s > 0, "node_wait_timeout_s", f"must be > 0, got {self.node_wait_timeout_s}")
        require(self.max_update_norm >= 0, "max_update_norm", f"must be >= 0, got {self.max_update_norm}")
        require(self.evaluate_every >= 0, "evaluate_every", f"must be >= 0 (0 = never), got {self.evaluate_every}")

    def _check_server_optimizer(self) -> None:
        opt = self.server_optimizer
        require(opt in SERVER_OPTIMIZERS, "server_optimizer", f"must be one of {list(SERVER_OPTIMIZERS)}, got {opt!r}")
        require(self.server_learning_rate > 0, "server_learning_rate", f"must be > 0, got {self.server_learning_rate}")
        require(0 <= self.server_momentum < 1, "server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        require(self.eta >= 0, "eta", f"must be >= 0 (0 = Flower's default), got {self.eta}")
        require(0 <= self.beta_1 < 1, "beta_1", f"must be in [0, 1), got {self.beta_1}")
        require(0 <= self.beta_2 < 1, "beta_2", f"must be in [0, 1), got {self.beta_2}")
        require(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1) (0 = off), got {self.ema_decay}")
        # A setting the chosen optimiser ignores would change nothing while looking as if it did.
        takes = {"server_learning_rate": ("fedavgm",), "server_momentum": ("fedavgm",), "eta": _FEDOPT,
                 "beta_1": ("fedadam", "fedyogi"), "beta_2": ("fedadam", "fedyogi"), "tau": _FEDOPT}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, optimizers in takes.items():
            require(opt in optimizers or getattr(self, key) == defaults[key], key,
                    f"is an option of server_optimizer {' or '.join(optimizers)}, not of {opt!r}; "
                    f"remove it or set it to its default {defaults[key]}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return Path(self.output_dir) / "metrics.jsonl"

    @property
    def final_model_path(self) -> Path:
        return Path(self.final_model) if self.final_model else Path(self.output_dir) / "final_model.pt"


@dataclass(frozen=True)
class FedsynthConfig:
    """Everything the coordinator decides for one federation."""

    federation: FederationConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        levels = len(self.model.channels) - 1
        require(self.data.image_size % (2 ** levels) == 0, "data.image_size",
                 f"must be divisible by 2**(len(model.channels)-1) = {2 ** levels}, got {self.data.image_size}")
        # Opacus' hooks clip every row of the forward as a sample of its own: with K rows per patient
        # a patient would weigh K clipped gradients while the accountant counts one.
        require(self.training.noise_multiplicity == 1 or not self.privacy.enabled
                or self.privacy.grad_sample_mode == "fedsynth", "training.noise_multiplicity",
                f"{self.training.noise_multiplicity} needs privacy.grad_sample_mode 'fedsynth' (Opacus' "
                f"{self.privacy.grad_sample_mode!r} mode would clip each draw as a separate patient)")


@dataclass(frozen=True)
class PrivacyBudget:
    """A hospital's total privacy budget over every step it ever takes."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        require(0 < self.epsilon <= 100, "epsilon", f"must be in (0, 100], got {self.epsilon}")
        require(0 < self.delta < 1e-2, "delta", f"must be in (0, 0.01), got {self.delta}")


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's own settings: they never leave the site."""

    site_id: str
    data_dir: str
    state_dir: str
    privacy_budget: PrivacyBudget
    labels_csv: str = ""
    allow_non_private: bool = False
    # The hospital's policy file (client/policy.py): limits and approved apps the server cannot loosen.
    policy_file: str = ""
    # true: unreadable image files are reported and skipped; false: any of them stops the site.
    skip_bad_files: bool = False
    # Share of patients held out for the validation loss. The site fixes it, never the server: a task
    # choosing it could have trained patients reported as held out.
    val_fraction: float = 0.1
    # TESTS ONLY: seed DP rounds from the federation config instead of OS entropy. Whoever knows the
    # config (the server) can then reproduce the DP noise and sampling, so epsilon means nothing.
    unsafe_reproducible_dp: bool = False

    def __post_init__(self) -> None:
        require(bool(self.site_id) and self.site_id.replace("-", "").replace("_", "").isalnum(), "site_id",
                 f"must be letters, digits, '-' or '_', got {self.site_id!r}")
        require(bool(self.data_dir), "data_dir", "must be set")
        require(bool(self.state_dir), "state_dir", "must be set")
        require(0 <= self.val_fraction < 0.9, "val_fraction", f"must be in [0, 0.9), got {self.val_fraction}")


# ----------------------------------------------------------------------------------------
# Loading

# A config file is a few dozen keys: these bounds refuse a hostile file long before it costs
# memory, stack or screen space.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
# Values quoted in error messages are cut here: a wrong value needs recognising, not printing whole.
_SHOWN_CHARS = 100
_SHOWN_REASON_CHARS = 400


def _clip(text: str, limit: int = _SHOWN_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _show(value: Any) -> str:
    """``repr(value)`` for an error message, at most about 100 characters."""
    return _clip(repr(value))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases, duplicate keys and deep nesting.

    Aliases are how a "billion laughs" file of a few hundred bytes becomes a structure that
    is exponentially large once walked; no fedsynth setting needs them. A duplicate key
    silently overriding the first is how a reviewed setting gets replaced further down.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in fedsynth config files", self.peek_event().start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _value in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # SafeLoader itself refuses unhashable keys
                constructed = self.construct_object(key_node)
                key = (type(constructed), constructed)  # 1 and true are different keys, though equal in Python
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {_show(constructed)}", key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; YAML lists become tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. str | tuple[str, ...]: the arm the YAML value fits
        arms = typing.get_args(tp)
        for arm in arms:
            if isinstance(value, (list, tuple)) if typing.get_origin(arm) is tuple else isinstance(value, arm):
                return _coerce(value, arm, key)
        names = " or ".join("a list" if typing.get_origin(a) is tuple else f"a {_type_name(a)}" for a in arms)
        raise _Invalid(key, f"must be {names}, got {type(value).__name__}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Invalid(key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Invalid(key, f"must be a list of {_type_name(item_tp)}, got {type(value).__name__}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(key, f"must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(key, f"must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # PyYAML reads 1e-5 (no dot) as a string
                value = float(value)
            except ValueError:
                raise _Invalid(key, f"must be a number, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Invalid(key, f"must be a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(key, f"must be a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r}")  # a schema bug, not user error


# Keys that left a schema: naming where they went beats "unknown key", and a coordinator that
# still sets one learns that it no longer decides it.
MOVED_KEYS = {
    "training.val_fraction": "no longer a federation setting: each site sets its own held-out share "
                             "(val_fraction in the site config), so the server cannot choose which patients count as held out",
}


def without_moved_keys(data: Any) -> Any:
    """A config recorded before keys moved (a checkpoint's), without them: a record of a past run is
    not a request, and refusing it would make older checkpoints unreadable."""
    if not isinstance(data, dict):
        return data
    data = {**data}
    for dotted in MOVED_KEYS:
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section] = {k: v for k, v in data[section].items() if k != key}
    return data


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    moved = sorted(prefix + name for name in data if isinstance(name, str) and prefix + name in MOVED_KEYS)
    if moved:
        raise _Invalid(moved[0], MOVED_KEYS[moved[0]])
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise _Invalid(prefix + _clip(str(unknown[0])), f"unknown key (allowed: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Invalid(prefix + name, "is required")
            continue
        kwargs[name] = _coerce(data[name], hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except _Invalid as err:
        raise _Invalid(prefix + err.key, err.reason) from None


def config_from_dict(cls: type[T], data: Any, source: str) -> T:
    """Build and validate ``cls`` from plain data; errors name ``source`` and the key."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; expected a mapping of settings")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return _build(cls, data)
    except _Invalid as err:
        # A moved key's message holds no site detail: the server may be told it.
        public = f"{err.key}: {err.reason}" if err.key in MOVED_KEYS else None
        # Validators quote values; the cut keeps a hostile one from flooding the terminal or log.
        raise ConfigError(f"{source}: {err.key}: {_clip(err.reason, _SHOWN_REASON_CHARS)}", public=public) from None


def read_yaml(path: Path) -> Any:
    """Parse a config file with :class:`_StrictLoader`; every failure is a ConfigError naming the file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{path}: not a regular file")  # opening a FIFO would block
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a fedsynth config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_clip(str(err), _SHOWN_REASON_CHARS)})") from None


def _resolve(base: Path, value: str) -> str:
    """Paths in a config file are relative to that file, not to whoever reads it."""
    if not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_federation_config(path: str | Path) -> FedsynthConfig:
    path = Path(path)
    cfg = config_from_dict(FedsynthConfig, read_yaml(path), str(path))
    fed = dataclasses.replace(
        cfg.federation,
        output_dir=_resolve(path.parent, cfg.federation.output_dir),
        final_model=_resolve(path.parent, cfg.federation.final_model),
    )
    model = dataclasses.replace(cfg.model, init_checkpoint=_resolve(path.parent, cfg.model.init_checkpoint))
    return dataclasses.replace(cfg, federation=fed, model=model)


def load_site_config(path: str | Path) -> SiteConfig:
    path = Path(path)
    cfg = config_from_dict(SiteConfig, read_yaml(path), str(path))
    return dataclasses.replace(
        cfg,
        data_dir=_resolve(path.parent, cfg.data_dir),
        state_dir=_resolve(path.parent, cfg.state_dir),
        labels_csv=_resolve(path.parent, cfg.labels_csv),
        policy_file=_resolve(path.parent, cfg.policy_file),
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-friendly form (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_to_json(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def write_yaml(path: str | Path, data: dict[str, Any]) -> Path:
    from common.fileio import write_bytes_atomic

    return write_bytes_atomic(path, yaml.safe_dump(data, sort_keys=False).encode("utf-8"))
