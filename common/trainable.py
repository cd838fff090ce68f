"""Which UNet parameters a site trains and sends (``training.trainable``), for both sides.

Parameter-efficient DP fine-tuning: after public pretraining, training only a small subset of
the UNet under DP means fewer coordinates for the same Gaussian noise (the noise norm grows with
the square root of the coordinates trained), and only that subset travels back to the server.

``training.trainable`` is one of

* ``all`` (default): every parameter trains and travels, as before;
* ``efficient``: the fixed subset :data:`EFFICIENT_PATTERNS` (normalisation layers, attention
  blocks, the time and class embeddings with each residual block's projection of them, and the
  output layer): about 15% of the example config's 1.1M-parameter UNet;
* a list of glob patterns (``fnmatch``, case-sensitive; ``*`` also matches dots) over the
  parameter names of ``common.model.build_unet`` (e.g. ``down_blocks.0.resnets.0.conv1.conv.weight``);
  each pattern must match at least one parameter of the configured model.

Privacy is unchanged: the site clips each patient's gradient over the trainable parameters only
and noises only those, so one patient still moves the noised sum by at most ``C`` (the clipping
norm) and the accountant's (sigma, q, steps) are the same. Frozen parameters are the global
weights the server sent: they carry no patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from common.config import FedsynthConfig

ALL = "all"
EFFICIENT = "efficient"
FIELD = "training.trainable"
# A federation config travels to every site: bounded, so matching stays cheap whatever it holds.
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 200

# MONAI DiffusionModelUNet names (common/model.py build_unet), e.g. for channels (32, 64, 64):
#   time_embed.{0,2}.*                       the timestep MLP
#   class_embedding.weight                   the class embedding (null class included)
#   *.resnets.N.time_emb_proj.*              each residual block's projection of the time+class embedding
#   *.resnets.N.norm{1,2}.*, middle_block.resnet_{1,2}.norm{1,2}.*   the residual blocks' GroupNorms
#   *.attentions.N.*, middle_block.attention.*   attention blocks: GroupNorm, to_q/k/v, out_proj
#   out.0.* (GroupNorm), out.2.conv.*        the output layer
# Every convolution of the residual blocks, the samplers, the skip connections and conv_in stays frozen.
EFFICIENT_PATTERNS: tuple[str, ...] = (
    "time_embed.*",
    "class_embedding.*",
    "*.time_emb_proj.*",
    "*.norm1.*",
    "*.norm2.*",
    "*.attentions.*",
    "middle_block.attention.*",
    "out.*",
)

Spec = str | tuple[str, ...]


def spec_problem(spec: object) -> str | None:
    """What is wrong with a ``training.trainable`` value on its own (without the model), or ``None``."""
    if isinstance(spec, str):
        if spec in (ALL, EFFICIENT):
            return None
        return (f"must be '{ALL}', '{EFFICIENT}' or a list of glob patterns over parameter names, "
                f"got {spec[:MAX_PATTERN_CHARS]!r}")
    if not isinstance(spec, tuple) or not spec:
        return "must be 'all', 'efficient' or a non-empty list of glob patterns over parameter names"
    if len(spec) > MAX_PATTERNS:
        return f"at most {MAX_PATTERNS} patterns, got {len(spec)}"
    for pattern in spec:
        if not isinstance(pattern, str) or not pattern.strip() or len(pattern) > MAX_PATTERN_CHARS:
            return f"each pattern must be a non-empty string of at most {MAX_PATTERN_CHARS} characters, got {pattern!r:.80}"
    if len(set(spec)) != len(spec):
        return "patterns must be unique"
    return None


def is_partial(spec: Spec) -> bool:
    """Whether a site trains, and sends, only part of the model."""
    return spec != ALL


def select(names: Sequence[str], spec: Spec) -> tuple[str, ...]:
    """The names of ``names`` (a model's parameters, in model order) that ``spec`` trains.

    Raises:
        ConfigError: a listed pattern matches no parameter (named, with the field), or nothing
            at all would train. The message holds only config values: it may go to the server.
    """
    if spec == ALL:
        return tuple(names)
    patterns = EFFICIENT_PATTERNS if spec == EFFICIENT else tuple(spec)
    if spec != EFFICIENT:
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                example = f" (names look like {names[0]!r})" if names else ""
                raise _error(f"{FIELD}: pattern {pattern!r} matches no parameter of the configured model{example}")
    chosen = tuple(name for name in names if any(fnmatchcase(name, p) for p in patterns))
    if not chosen:
        raise _error(f"{FIELD}: {spec!r} selects no parameter of the configured model")
    return chosen


def trainable_names(cfg: FedsynthConfig) -> tuple[str, ...]:
    """The parameters ``cfg`` trains, in model order, measured on PyTorch's meta device (no memory).

    Raises:
        ConfigError: see :func:`select`; or the model itself cannot be built.
    """
    from common.model import trainable_shapes

    try:
        names = list(trainable_shapes(cfg.model))
    except ValueError as err:
        raise _error(str(err)) from None
    return select(names, cfg.training.trainable)


def trainable_count(cfg: FedsynthConfig) -> int:
    """How many values the parameters ``cfg`` trains hold: the dimension DP noise is added in."""
    import math

    from common.model import trainable_shapes

    shapes = trainable_shapes(cfg.model)
    return sum(math.prod(shapes[name]) for name in trainable_names(cfg))


def freeze_outside(model: torch.nn.Module, spec: Spec) -> tuple[str, ...]:
    """Switch ``requires_grad`` off for every parameter of ``model`` that ``spec`` does not train.

    Call it before the optimiser and the DP step are built: both take the parameters that still
    require a gradient. Returns the trained names.
    """
    params = dict(getattr(model, "_module", model).named_parameters())
    chosen = select(list(params), spec)
    keep = set(chosen)
    for name, param in params.items():
        param.requires_grad_(name in keep)
    return chosen


def _error(message: str) -> ConfigError:
    return ConfigError(message, public=message)
