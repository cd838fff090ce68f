"""Where the randomness of one training round comes from.

Under DP every random choice of a round (the Poisson sample of patients, the slice each one
contributes, timesteps, diffusion noise, label dropout and the Gaussian noise of DP-SGD) must
be unknown to the server: anything derived from what it sent (the federation config, the
round number, the site's public name) lets it replay the round, strip the noise and test
whether a patient was in the data. So a DP round draws fresh entropy from the operating
system; only non-private training, or a site that sets the test-only
``unsafe_reproducible_dp``, uses a seed derived from the config.

torch's CPU generator (mt19937) keeps only the low 32 bits of a seed given to
``manual_seed``: seeded that way, a round would be one of 2**32 possible streams, few
enough to search. Its whole 624-word state is written from ``os.urandom`` instead. A CUDA
generator (Philox) takes the full 64-bit seed.

Opacus' ``secure_mode`` would draw the noise from ``torchcsprng``; that package has no
build for torch 2 (its last release targets torch 1.8), so it is not used here.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# torch's CPU generator state (ATen CPUGeneratorImplStateLegacy): the_initial_seed (u64),
# left (i32), seeded (i32), next (u64), then the 624 mt19937 words, each stored as a u64.
_MT_WORDS = 624
_WORDS_OFFSET = 24
_STATE_BYTES = 5056


def _state_words(state: torch.Tensor) -> np.ndarray:
    return state.numpy()[_WORDS_OFFSET:_WORDS_OFFSET + 8 * _MT_WORDS].view("<u8")


def _mt_init(seed: int) -> tuple[int, int]:
    """The first two words mt19937's seeding writes (the reference init_genrand)."""
    first = seed & 0xFFFFFFFF
    return first, (1812433253 * (first ^ (first >> 30)) + 1) & 0xFFFFFFFF


@lru_cache(maxsize=1)
def _check_state_layout() -> None:
    """Refuse, rather than seed weakly, if this torch lays out its generator state otherwise."""
    probe = 0x5EED_F00D_1234_5678
    state = torch.Generator().manual_seed(probe).get_state()
    if state.numel() != _STATE_BYTES or tuple(int(w) for w in _state_words(state)[:2]) != _mt_init(probe):
        raise RuntimeError(
            f"torch {torch.__version__}: unexpected CPU generator state layout; cannot seed it from OS entropy, "
            "so DP training is refused"
        )


def fill_from_entropy(generator: torch.Generator) -> torch.Generator:
    """Every word of a CPU generator's mt19937 state from ``os.urandom``; returns ``generator``."""
    _check_state_layout()
    generator.manual_seed(secrets.randbits(64))  # resets the stream position and any cached normal sample
    state = generator.get_state().clone()
    _state_words(state)[:] = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype="<u4")
    generator.set_state(state)
    return generator


def is_seeded_state(generator: torch.Generator) -> bool:
    """Whether the generator's state is one ``manual_seed`` can produce (for tests and checks)."""
    words = _state_words(generator.get_state())
    return tuple(int(w) for w in words[:2]) == _mt_init(int(words[0]))


@dataclass(frozen=True)
class RoundRandomness:
    """The sources of one round: from ``seed`` when reproducible, else fresh OS entropy for each."""

    seed: int | None = None

    @property
    def reproducible(self) -> bool:
        return self.seed is not None

    def seed_global(self) -> None:
        """torch's global RNGs: Opacus' DPOptimizer and :class:`client.dp_sgd.DPSGDStep` draw their noise there."""
        if self.seed is not None:
            torch.manual_seed(self.seed)
            return
        fill_from_entropy(torch.default_generator)
        # Lazy (no CUDA context is created for it) and a no-op without CUDA; one secret for every
        # device is fine, as a round trains on one.
        torch.cuda.manual_seed_all(secrets.randbits(64))

    def cpu_generator(self) -> torch.Generator:
        if self.seed is not None:
            return torch.Generator().manual_seed(self.seed)
        return fill_from_entropy(torch.Generator())

    def device_generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed if self.seed is not None else secrets.randbits(64))

    def numpy_seed(self) -> int:
        return self.seed if self.seed is not None else secrets.randbits(128)
