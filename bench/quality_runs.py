"""The quality benchmark's rows: what each trains (or scores), and what each depends on.

Main rows: central no-DP and federated no-DP, each from scratch and from public pretraining,
federated + DP from scratch, federated + DP from public pretraining (all parameters, and
``training.trainable: efficient``), and ``public_only`` (the pretrained checkpoint itself, so a
reader sees what the hospitals' data added). Federated no-DP from pretraining against federated +
DP from pretraining is what DP costs, with everything else equal.

Ablation rows each take one ingredient away from "federated + DP from pretraining": its EMA (the
same run's raw global weights, scored: no extra training), the kept optimiser state
(``keep_optimizer_state: false``), noise multiplicity (K = 1) and the planner (the preset's fixed
batch with a calibrated noise multiplier). "Minus pretraining" is the scratch row itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSpec:
    name: str
    kind: str  # "pretrain": train on the public split and score it; "central"; "federated"; "raw": score ``source``'s global weights
    title: str
    dp: bool = False
    pretrained: bool = False
    trainable: str = "all"
    planner: bool = True
    noise_multiplicity: int | None = None  # None: the preset's (DP rows)
    keep_optimizer_state: bool | None = None  # None: the preset's
    source: str = ""  # "raw": the run whose global weights are scored
    ablation: str = ""  # the ingredient this row takes away ("" = a main row)

    @property
    def needs(self) -> tuple[str, ...]:
        """Runs that must finish before this one starts."""
        return ((PUBLIC_ONLY,) if self.pretrained else ()) + ((self.source,) if self.source else ())


PUBLIC_ONLY = "public_only"
FULL = "federated_dp_pretrained"
SCRATCH = "federated_dp"

SPECS = (
    RunSpec(PUBLIC_ONLY, "pretrain", "public only (pretrained, no hospital data)"),
    RunSpec("central", "central", "central, no DP"),
    RunSpec("federated", "federated", "federated, no DP"),
    RunSpec("central_pretrained", "central", "central, no DP, from pretraining", pretrained=True),
    RunSpec("federated_pretrained", "federated", "federated, no DP, from pretraining", pretrained=True),
    RunSpec(SCRATCH, "federated", "federated + DP, from scratch", dp=True),
    RunSpec(FULL, "federated", "federated + DP, from pretraining", dp=True, pretrained=True),
    RunSpec("federated_dp_pretrained_efficient", "federated", "federated + DP, from pretraining, trainable: efficient",
            dp=True, pretrained=True, trainable="efficient"),
    RunSpec("ablation_no_ema", "raw", "minus EMA (the same run's raw global weights)", dp=True, pretrained=True,
            source=FULL, ablation="EMA"),
    RunSpec("ablation_restart", "federated", "minus no-restart (keep_optimizer_state: false)", dp=True, pretrained=True,
            keep_optimizer_state=False, ablation="no-restart"),
    RunSpec("ablation_k1", "federated", "minus noise multiplicity (K = 1)", dp=True, pretrained=True,
            noise_multiplicity=1, ablation="noise multiplicity"),
    RunSpec("ablation_no_planner", "federated", "minus planner (fixed batch, calibrated sigma)", dp=True,
            pretrained=True, planner=False, ablation="planner"),
)
BY_NAME = {s.name: s for s in SPECS}
RUNS = tuple(s.name for s in SPECS)


def with_dependencies(names: list[str]) -> list[str]:
    """``names`` plus every run they need, in :data:`SPECS` order."""
    wanted = set(names)
    while True:
        more = {n for w in wanted for n in BY_NAME[w].needs} - wanted
        if not more:
            return [s.name for s in SPECS if s.name in wanted]
        wanted |= more
