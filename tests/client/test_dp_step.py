"""fedsynth's own DP-SGD step is Opacus' mechanism: exact per-sample clipping, same noise, same sampling."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.client_app import train_reply_content
from client.dp_sgd import DPSGDStep, PlainStep
from client import grad_kernels, grad_sample
from client.grad_sample import GradSampler
from client.privacy import expected_batch_size, make_private, poisson_loader
from client.site_data import SiteSlices
from client.training import PatientDataset, TrainResult, train_round
from common.config import DiffusionConfig, FedsynthConfig, ModelConfig, config_from_dict, load_site_config
from common.errors import ConfigError
from common.model import autocast_dtype, build_train_scheduler, build_unet, diffusion_loss, trainable_state
from common.trainable import EFFICIENT_PATTERNS, freeze_outside
from tests.conftest import tiny_federation, write_site

TINY = ModelConfig(classes=("disc", "ring"), channels=(8, 8), attention_levels=(False, True), norm_num_groups=4,
                   num_head_channels=8)


def _batch(n: int = 6, size: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch with its noise and timesteps fixed, so a per-example loop sees exactly the same losses."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand((n, 1, size, size), generator=g) * 2 - 1, "noise": torch.randn((n, 1, size, size), generator=g),
            "t": torch.randint(0, 100, (n,), generator=g), "y": torch.arange(n) % 3}  # label 2 is the null class


def _losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], index: slice = slice(None)) -> torch.Tensor:
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=100))
    noisy = sched.add_noise(original_samples=batch["x"][index], noise=batch["noise"][index], timesteps=batch["t"][index])
    pred = model(x=noisy, timesteps=batch["t"][index], class_labels=batch["y"][index])
    return ((pred - batch["noise"][index]) ** 2).flatten(1).mean(dim=1)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_unet(TINY)


def _per_example_reference(model: torch.nn.Module, batch: dict, max_grad_norm: float,
                           losses: Callable[..., torch.Tensor] = _losses) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Clipped-summed gradient from one ordinary backward pass per example of ``losses`` (per patient)."""
    n = len(batch["x"])
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    norms = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        losses(model, batch, slice(i, i + 1)).sum().backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (norm + 1e-6))
        for name in total:
            total[name] += factor * grads[name]
    model.zero_grad(set_to_none=True)
    return total, norms


def _rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float((got[k] - want[k]).double().pow(2).sum()) for k in want))
    den = math.sqrt(sum(float(want[k].double().pow(2).sum()) for k in want))
    return num / den


@pytest.mark.parametrize("deferred", [False, True], ids=["kept-rows", "deferred-layers"])
def test_clipped_sum_matches_a_per_example_loop(deferred: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grad_sample, "defer", lambda *sizes: deferred)
    model, batch = _model(), _batch()
    _, norms = _per_example_reference(model, batch, max_grad_norm=1e9)
    clip = float(np.median(norms))  # half the examples are clipped, half are not
    reference, _ = _per_example_reference(model, batch, clip)
    expected = 4
    step = DPSGDStep(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                     expected_batch_size=expected)
    step.step(lambda: _losses(model, batch))
    got = {name: p.grad.detach() * expected for name, p in model.named_parameters()}
    assert _rel_error(got, reference) < 1e-4
    assert all(_rel_error({k: got[k]}, {k: reference[k]}) < 1e-4 for k in reference if reference[k].norm() > 0)


@pytest.mark.parametrize(("grouped", "deferred"), [(False, False), (True, False), (False, True)],
                         ids=["per-sample-calls", "grouped-call", "deferred"])
def test_per_sample_gradients_are_exact_and_autograd_skips_the_summed_gradient(
        grouped: bool, deferred: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grad_kernels, "_use_grouped", lambda module, b: grouped)  # both conv kernels
    monkeypatch.setattr(grad_sample, "defer", lambda *sizes: deferred)  # kept rows, or input + output gradients
    model, batch = _model(), _batch(n=4)
    sampler = GradSampler(model)
    with sampler.recording():
        losses = _losses(model, batch)
    per_sample = sampler.backward(losses)
    grads = per_sample.materialise()
    assert all(p.grad is None for p in model.parameters())  # no weight-gradient kernel ran for .grad
    assert set(grads) == set(model.parameters())
    for i in range(4):
        model.zero_grad(set_to_none=True)
        _losses(model, batch, slice(i, i + 1)).sum().backward()
        want = {name: p.grad for name, p in model.named_parameters()}
        got = {name: grads[p][i] for name, p in model.named_parameters()}
        assert _rel_error(got, want) < 1e-5


def _opacus_hooks_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """One step of Opacus' own GradSampleModule + DPOptimizer, noise off, clip 0.05, expected batch 3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model)
        optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.05,
                                expected_batch_size=3)
        PlainStep(optimizer).step(lambda: _losses(wrapped, batch))


def test_same_step_as_opacus_hooks() -> None:
    """Noise off: fedsynth's step and Opacus' GradSampleModule + DPOptimizer give the same update."""
    batch = _batch(n=5)
    ours = _model()
    DPSGDStep(ours, torch.optim.SGD(ours.parameters(), lr=1.0), 0.0, 0.05, expected_batch_size=3).step(lambda: _losses(ours, batch))
    theirs = _model()
    _opacus_hooks_step(theirs, batch)
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    theirs_grads = {name: p.grad for name, p in theirs.named_parameters()}
    assert _rel_error(ours_grads, theirs_grads) < 1e-5


def test_empty_batch_is_a_noise_only_step() -> None:
    model = _model()
    expected, sigma, clip = 4, 1.3, 0.7
    step = DPSGDStep(model, torch.optim.SGD(model.parameters(), lr=0.0), sigma, clip, expected,
                     noise_generator=torch.Generator().manual_seed(3))
    step.empty_step()
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        want = torch.normal(0.0, sigma * clip, size=p.shape, generator=g) / expected
        assert torch.allclose(p.grad, want)


def test_noise_has_the_configured_scale() -> None:
    model = _model()
    expected, sigma, clip = 8, 2.0, 0.5
    step = DPSGDStep(model, torch.optim.SGD(model.parameters(), lr=0.0), sigma, clip, expected,
                     noise_generator=torch.Generator().manual_seed(0))
    summed, _ = step.clipped_sum(lambda: _losses(model, _batch()))
    step.step(lambda: _losses(model, _batch()))
    noise = torch.cat([(p.grad * expected - summed[p]).flatten() for p in model.parameters()])
    assert abs(float(noise.std()) - sigma * clip) < 0.02 * sigma * clip
    assert abs(float(noise.mean())) < 0.01


def test_sampling_and_expected_batch_size_are_opacus_own(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (23, 1, 16, 16)).astype(np.float32)
    dataset = PatientDataset(images, np.zeros(23, np.int64), [np.array([i]) for i in range(23)], seed=0)
    model = _model()
    _, optimizer, opacus_loader, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), dataset, 4, 1.0, 1.0,
                                                  generator=torch.Generator().manual_seed(5))
    assert optimizer.expected_batch_size == expected_batch_size(23, 4)
    ours = poisson_loader(dataset, 4, generator=torch.Generator().manual_seed(5))
    assert ours.sample_rate == opacus_loader.sample_rate
    assert [len(x) for x, _ in ours] == [len(x) for x, _ in opacus_loader]


def test_unsupported_layer_is_named() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(NotImplementedError, match="layer '1' \\(BatchNorm2d\\)"):
        GradSampler(model)


def _slices(n: int = 30) -> SiteSlices:
    rng = np.random.default_rng(0)
    return SiteSlices(images=rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32),
                      labels=(np.arange(n) % 2).astype(np.int64), patients=[f"p{i:03d}" for i in range(n)],
                      classes=("disc", "ring"))


def _train_result(tmp_path: Path, name: str, **overrides: dict) -> TrainResult:
    overrides = {**overrides, "training": {"local_steps": 4, **overrides.get("training", {})}}
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", **overrides), "t")
    # Comparing two rounds needs the same noise in both: only the site's test-only switch allows that.
    site = load_site_config(write_site(tmp_path / name, "a", tmp_path / "data", unsafe_reproducible_dp=True))
    torch.manual_seed(0)
    return train_round(cfg, site, _slices(), trainable_state(build_unet(cfg.model)), server_round=1)


def _train(tmp_path: Path, name: str, **overrides: dict) -> dict[str, np.ndarray]:
    return _train_result(tmp_path, name, **overrides).arrays


def test_a_round_matches_opacus_hooks_step_for_step(tmp_path: Path) -> None:
    """Same Poisson batches, same noise draws, same clipping: the same weights up to float rounding."""
    ours = _train(tmp_path, "ours", privacy={"grad_sample_mode": "fedsynth"})
    theirs = _train(tmp_path, "theirs", privacy={"grad_sample_mode": "hooks"})
    assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) < 1e-6


def test_mixed_precision_is_a_no_op_on_cpu(tmp_path: Path) -> None:
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is None
    assert autocast_dtype("off", torch.device("cuda")) is None
    auto = _train(tmp_path, "auto", training={"mixed_precision": "auto"})
    off = _train(tmp_path, "off", training={"mixed_precision": "off"})
    assert all(np.array_equal(auto[k], off[k]) for k in auto)


# Noise multiplicity: each sample's loss is the mean over K (timestep, noise) draws, one forward pass over
# the batch repeated K times (repeat_interleave); one sample is still one clipped gradient.
K = 3


def _batch_k(n: int, k: int = K, size: int = 16, seed: int = 2) -> dict[str, torch.Tensor]:
    """``n`` images with ``k`` fixed (timestep, noise) draws each: row ``i*k + j`` is draw ``j`` of image ``i``."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand((n, 1, size, size), generator=g) * 2 - 1, "noise": torch.randn((n * k, 1, size, size), generator=g),
            "t": torch.randint(0, 100, (n * k,), generator=g), "y": torch.arange(n) % 3}


def _losses_k(model: torch.nn.Module, batch: dict[str, torch.Tensor], index: slice = slice(None), k: int = K) -> torch.Tensor:
    """Per-image mean of its k draws; ``index`` selects images (and so their k rows each)."""
    rows = slice(None if index.start is None else index.start * k, None if index.stop is None else index.stop * k)
    rep = {"x": batch["x"][index].repeat_interleave(k, 0), "y": batch["y"][index].repeat_interleave(k, 0),
           "noise": batch["noise"][rows], "t": batch["t"][rows]}
    return _losses(model, rep).view(-1, k).mean(dim=1)


@pytest.mark.parametrize(("grouped", "deferred"), [(False, False), (True, False), (False, True)],
                         ids=["per-sample-calls", "grouped-call", "deferred"])
def test_noise_multiplicity_per_sample_gradients_equal_a_per_example_loop(
        grouped: bool, deferred: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grad_kernels, "_use_grouped", lambda module, b: grouped)
    monkeypatch.setattr(grad_sample, "defer", lambda *sizes: deferred)
    model, batch = _model(), _batch_k(n=4)
    sampler = GradSampler(model)
    with sampler.recording():
        losses = _losses_k(model, batch)
    per_sample = sampler.backward(losses, repeats=K)
    grads = per_sample.materialise()
    norms = per_sample.sq_norms().sqrt()
    for i in range(4):
        model.zero_grad(set_to_none=True)
        _losses_k(model, batch, slice(i, i + 1)).sum().backward()  # patient i alone: the mean of its K draws
        want = {name: p.grad for name, p in model.named_parameters()}
        got = {name: grads[p][i] for name, p in model.named_parameters()}
        assert _rel_error(got, want) < 1e-5
        want_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in want.values()))
        assert abs(float(norms[i]) - want_norm) < 1e-4 * want_norm  # the norm of the patient's gradient, not per draw


@pytest.mark.parametrize("deferred", [False, True], ids=["kept-rows", "deferred-layers"])
def test_noise_multiplicity_clips_one_gradient_per_patient(deferred: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grad_sample, "defer", lambda *sizes: deferred)
    model, batch = _model(), _batch_k(n=6)
    _, norms = _per_example_reference(model, batch, max_grad_norm=1e9, losses=_losses_k)
    clip = float(np.median(norms))  # half the patients are clipped
    reference, _ = _per_example_reference(model, batch, clip, losses=_losses_k)
    step = DPSGDStep(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                     expected_batch_size=4, repeats=K)
    step.step(lambda: _losses_k(model, batch))
    got = {name: p.grad.detach() * 4 for name, p in model.named_parameters()}
    assert _rel_error(got, reference) < 1e-4


def test_rows_that_do_not_match_the_samples_are_refused() -> None:
    """A K-fold forward read as one row per sample would silently take the first N rows' gradients."""
    model, batch = _model(), _batch_k(n=4)
    sampler = GradSampler(model)
    with sampler.recording():
        losses = _losses_k(model, batch)
    with pytest.raises(RuntimeError, match="expected 4 samples x 1 rows"):
        sampler.backward(losses)


def test_diffusion_loss_averages_k_draws_per_image() -> None:
    model = _model().eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=100))
    x, y = _batch(n=3)["x"], torch.tensor([0, 1, 2])
    got = diffusion_loss(model, sched, x, y, torch.Generator().manual_seed(7), draws=K)
    # The same stream, drawn as diffusion_loss draws it: all N*K noises, then all N*K timesteps.
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((3 * K, *x.shape[1:]), generator=g)
    t = torch.randint(0, 100, (3 * K,), generator=g)
    for i in range(3):
        rows = [_losses(model, {"x": x[i:i + 1], "noise": noise[r:r + 1], "t": t[r:r + 1], "y": y[i:i + 1]})
                for r in range(i * K, i * K + K)]
        assert torch.allclose(got[i], torch.cat(rows).mean(), rtol=1e-5, atol=1e-7)
    assert torch.equal(diffusion_loss(model, sched, x, y, torch.Generator().manual_seed(7), draws=1),
                       diffusion_loss(model, sched, x, y, torch.Generator().manual_seed(7)))


def test_noise_multiplicity_is_validated_and_refused_with_opacus_modes(tmp_path: Path) -> None:
    for bad in (0, 65, -1):
        with pytest.raises(ConfigError, match="training.noise_multiplicity"):
            config_from_dict(FedsynthConfig, tiny_federation(tmp_path, training={"noise_multiplicity": bad}), "t")
    for mode in ("hooks", "functorch"):
        with pytest.raises(ConfigError, match="training.noise_multiplicity.*'fedsynth'"):
            config_from_dict(FedsynthConfig, tiny_federation(
                tmp_path, training={"noise_multiplicity": 2}, privacy={"grad_sample_mode": mode}), "t")
    # Without DP nothing is clipped: any mode's plain step averages the K draws correctly.
    cfg = config_from_dict(FedsynthConfig, tiny_federation(
        tmp_path, training={"noise_multiplicity": 2}, privacy={"enabled": False, "grad_sample_mode": "hooks"}), "t")
    assert cfg.training.noise_multiplicity == 2


def test_noise_multiplicity_costs_no_privacy(tmp_path: Path) -> None:
    """Same q, sigma and steps in the ledger: the same epsilon with K = 1 and K = 4, and the K-draw round trains."""
    one = _train_result(tmp_path, "one", training={"noise_multiplicity": 1})
    four = _train_result(tmp_path, "four", training={"noise_multiplicity": 4})
    assert four.steps == one.steps and four.epsilon == one.epsilon and four.epsilon > 0
    assert any(not np.array_equal(four.arrays[k], one.arrays[k]) for k in one.arrays)


# training.trainable: a frozen subset. The efficient subset plus the bias alone of some convolutions,
# so that a layer with a frozen weight and a trained bias is covered too.
FROZEN_SPEC = (*EFFICIENT_PATTERNS, "*.conv2.conv.bias")


def _frozen_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = _model()
    with torch.no_grad():  # MONAI zero-initialises some convolutions, and with them gradients upstream: not here
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    freeze_outside(model, FROZEN_SPEC)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(list(model.parameters()))
    return model, frozen


@pytest.mark.parametrize("deferred", [False, True], ids=["kept-rows", "deferred-layers"])
def test_frozen_subset_clipped_sum_matches_a_per_example_loop(deferred: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Norms, clipping and the sum over the trainable parameters only; the frozen ones get no gradient, no update."""
    monkeypatch.setattr(grad_sample, "defer", lambda *sizes: deferred)
    model, frozen = _frozen_model()
    batch = _batch()
    _, norms = _per_example_reference(model, batch, max_grad_norm=1e9)  # over the trainable parameters
    clip = float(np.median(norms))
    assert sum(n > clip for n in norms) >= 2  # some examples clipped, some not
    reference, _ = _per_example_reference(model, batch, clip)
    expected = 4
    step = DPSGDStep(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                     expected_batch_size=expected)
    step.step(lambda: _losses(model, batch))
    got = {name: p.grad.detach() * expected for name, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(reference)
    assert _rel_error(got, reference) < 1e-4
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p.detach(), frozen[name]), name


def test_frozen_subset_same_step_as_opacus_hooks() -> None:
    """Opacus' hooks mode takes a model with frozen parameters as is: the same clipped update, noise off."""
    batch = _batch(n=5)
    ours, frozen = _frozen_model()
    DPSGDStep(ours, torch.optim.SGD(ours.parameters(), lr=1.0), 0.0, 0.05, expected_batch_size=3).step(lambda: _losses(ours, batch))
    theirs, _ = _frozen_model()
    _opacus_hooks_step(theirs, batch)
    ours_grads = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {name: p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    assert _rel_error(ours_grads, theirs_grads) < 1e-5
    assert all(p.grad is None and torch.equal(p.detach(), frozen[n]) for n, p in theirs.named_parameters() if n in frozen)


def test_efficient_round_leaves_frozen_weights_bit_identical_and_sends_only_the_subset(tmp_path: Path) -> None:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server"), "t")
    torch.manual_seed(0)
    start = trainable_state(build_unet(cfg.model))  # what _train_result starts from
    result = _train_result(tmp_path, "eff", training={"trainable": "efficient"})
    assert result.trained and set(result.trained) < set(start)
    assert set(result.arrays) == set(start)  # the whole model: the validation loss loads it
    for name in start:
        if name in result.trained:
            continue
        assert np.array_equal(result.arrays[name], start[name]), name
    assert any(not np.array_equal(result.arrays[n], start[n]) for n in result.trained)
    content = train_reply_content(result, "a", "float32")
    assert set(content["arrays"].keys()) == set(result.trained)
    full = train_reply_content(dataclasses.replace(result, trained=()), "a", "float32")
    assert set(full["arrays"].keys()) == set(start)
    print(f"\ntiny model reply: {content['arrays'].count_bytes():,} bytes efficient, "
          f"{full['arrays'].count_bytes():,} bytes all")


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_efficient_round_matches_opacus_step_for_step(tmp_path: Path, mode: str) -> None:
    ours = _train_result(tmp_path, "ours", training={"trainable": "efficient"}, privacy={"grad_sample_mode": "fedsynth"})
    theirs = _train_result(tmp_path, "theirs", training={"trainable": "efficient"}, privacy={"grad_sample_mode": mode})
    assert ours.trained == theirs.trained
    assert max(float(np.abs(ours.arrays[k] - theirs.arrays[k]).max()) for k in ours.arrays) < 1e-6
