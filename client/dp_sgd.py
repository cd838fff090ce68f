"""One local optimiser step: plain, or DP-SGD on :mod:`client.grad_sample`'s per-sample gradients.

The DP-SGD step is Opacus' mechanism (``DPOptimizer`` with flat clipping and
``loss_reduction="mean"``), computed more cheaply:

* ``g_i``: the gradient of sample ``i``'s own loss, over all trainable parameters together;
* clip: ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus' formula, 1e-6 included);
* ``grad = (sum_i c_i g_i + N(0, (sigma C)^2 I)) / expected_batch_size``;
* the wrapped optimiser's step on ``grad``.

Poisson sampling of patients and the accounting are untouched (:mod:`client.privacy`): only
how the per-sample gradients are computed differs from Opacus' hooks.

With ``training.trainable`` a subset (common/trainable.py), the frozen parameters have
``requires_grad`` off: ``g_i`` and its norm, the clipping and the noise cover the trainable
parameters only, so a patient still moves the noised sum by at most ``C`` and the accounting
(sigma, q, steps) is unchanged; fewer coordinates simply carry the same noise per coordinate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from client.grad_sample import GradSampler, PerSampleGrads

# Computes the batch's per-sample losses, shape (N,), inside the step (the forward pass must
# run where the step can observe it).
LossFn = Callable[[], torch.Tensor]


class LocalStep(Protocol):
    def step(self, compute_losses: LossFn) -> torch.Tensor:
        """One optimiser step on the batch; returns the mean loss, detached, on the model's device."""

    def empty_step(self) -> None:
        """The step of an empty Poisson batch (DP: noise only; it still counts as a step)."""


class PlainStep:
    """Backward on the mean loss then the optimiser's step: non-DP training, or an Opacus-wrapped optimiser."""

    def __init__(self, optimizer: torch.optim.Optimizer, empty: Callable[[], None] | None = None) -> None:
        self.optimizer = optimizer
        self._empty = empty

    def step(self, compute_losses: LossFn) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = compute_losses().mean()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def empty_step(self) -> None:
        if self._empty is not None:
            self._empty()


def clip_and_sum(grads: PerSampleGrads, max_grad_norm: float) -> dict[nn.Parameter, torch.Tensor]:
    """``sum_i c_i g_i`` per parameter, each sample's gradient (over all parameters) clipped to L2 norm
    ``max_grad_norm``: ``c_i = min(1, C / (||g_i|| + 1e-6))``."""
    norms = grads.sq_norms().sqrt()
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return grads.weighted_sum(factor)


class DPSGDStep:
    """DP-SGD with exact per-sample clipping and one Gaussian noise draw per step.

    Args:
        expected_batch_size: what the noisy sum is divided by, as Opacus does:
            ``int(num_patients * sample_rate)``, not the size of the batch drawn.
        noise_generator: for tests; ``None`` uses torch's global RNG, as Opacus does.
        repeats: noise multiplicity: the loss function's forward pass runs on each sample
            repeated this many times (``repeat_interleave``) and returns the per-sample mean,
            shape ``(N,)``; each sample is still one clipped gradient, the mechanism (and its
            accounting) unchanged.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, noise_generator: torch.Generator | None = None,
                 repeats: int = 1) -> None:
        if expected_batch_size < 1:
            raise ValueError(f"expected_batch_size must be >= 1, got {expected_batch_size}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.sampler = GradSampler(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.noise_generator = noise_generator
        self.repeats = repeats

    def clipped_sum(self, compute_losses: LossFn) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
        """The clipped, summed per-sample gradients (no noise) per parameter, and the per-sample losses."""
        with self.sampler.recording():
            losses = compute_losses()
        return clip_and_sum(self.sampler.backward(losses, self.repeats), self.max_grad_norm), losses.detach()

    def step(self, compute_losses: LossFn) -> torch.Tensor:
        summed, losses = self.clipped_sum(compute_losses)
        self._apply({p: summed[p] for p in self.params})
        return losses.mean()

    def empty_step(self) -> None:
        self._apply({p: torch.zeros_like(p) for p in self.params})

    def _apply(self, summed: dict[nn.Parameter, torch.Tensor]) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p, g in summed.items():
            if std > 0:
                g = g + torch.normal(0.0, std, size=g.shape, device=g.device, dtype=g.dtype, generator=self.noise_generator)
            p.grad = (g / self.expected_batch_size).view_as(p)  # replaces, never accumulates: no zero_grad needed
        self.optimizer.step()
