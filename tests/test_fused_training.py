"""Fused training (many members in one forward and backward pass) is separate training, to float tolerance."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.fused_training import (MemberJob, activation_floats, fusable, fused_delta, members_per_pass,
                                      plan_passes, train_members)
from simex_ray.losses import per_sample_delta
from simex_ray.models import create_autoencoder
from simex_ray.training import OPTIMIZERS, TrainConfig, train_member


def _jobs(config: TrainConfig, sizes=(40, 37, 50), epochs=None, seed=0):
    """Members on their own digits of different sizes (so their last batches differ), as `digits` spec images."""
    x = data.load("digits", fmt=config.format).x
    rng = np.random.default_rng(seed)
    jobs = []
    for k, n in enumerate(sizes):
        idx = rng.permutation(len(x))[:n + 12]
        cfg = config if epochs is None else TrainConfig.from_dict({**config.to_dict(), "epochs": epochs[k]})
        jobs.append(MemberJob(f"m{k}", cfg, x[idx[:n]], x[idx[n:]]))
    return jobs


def _close(fused, separate, rtol):
    (m1, h1), (m2, h2) = fused, separate
    assert [h["epoch"] for h in h1] == [h["epoch"] for h in h2]
    for a, b in zip(h1, h2):
        assert a["test_delta"] == pytest.approx(b["test_delta"], rel=rtol)
        assert a["train_delta"] == pytest.approx(b["train_delta"], rel=rtol)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol)


# RMSprop's and Adagrad's first steps are lr·g/|g|-sized whatever |g|: at the default lr a gradient that is
# zero up to rounding flips a whole step, so they are compared at a smaller lr (same arithmetic, no chaos).
SMALL_LR = {"rmsprop": 1e-4, "adagrad": 1e-3}


@pytest.mark.parametrize("loss", ["mse", "issim"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_fused_lenet_training_equals_separate_training(optimizer, loss):
    config = TrainConfig(epochs=2, optimizer=optimizer, loss=loss, lr=SMALL_LR.get(optimizer))
    jobs = _jobs(config, epochs=[2, 1, 2])  # members stop at different epochs too
    fused = train_members(jobs)
    for job, got in zip(jobs, fused):
        _close(got, train_member(job.x_train, job.x_test, job.config), rtol=1e-4)


@pytest.mark.parametrize("arch,fmt", [("conv", "3x16x16"), ("mlp", "1x28x28")])
@pytest.mark.parametrize("loss", ["mse", "issim"])
def test_fused_training_of_other_architectures_equals_separate_training(arch, fmt, loss):
    config = TrainConfig(architecture=arch, image_format=fmt, epochs=2, loss=loss)
    jobs = _jobs(config, sizes=(30, 21))
    for job, got in zip(jobs, train_members(jobs)):
        _close(got, train_member(job.x_train, job.x_test, job.config), rtol=1e-4)


@pytest.mark.parametrize("arch,fmt", [("lenet", "1x28x28"), ("conv", "1x28x28"), ("conv", "3x32x32"),
                                      ("mlp", "3x16x16")])
@pytest.mark.parametrize("loss", ["mse", "issim"])
def test_one_fused_step_gives_each_member_its_own_gradient(arch, fmt, loss):
    torch.manual_seed(0)
    models = [create_autoencoder(arch, fmt) for _ in range(3)]
    x = torch.rand(3, 8, *models[0].image_format.shape)  # each member its own batch
    fused_delta(models, x, loss).mean(1).sum().backward()
    fused = [[p.grad.clone() for p in m.parameters()] for m in models]
    for k, m in enumerate(models):
        m.zero_grad()
        per_sample_delta(x[k], m(x[k]), loss).mean().backward()
        for g, p in zip(fused[k], m.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-6)


def test_one_member_is_train_member_bit_for_bit():
    config = TrainConfig(epochs=2)
    job = _jobs(config, sizes=(45,))[0]
    (m1, h1), = train_members([job])
    m2, h2 = train_member(job.x_train, job.x_test, config)
    assert [h["test_delta"] for h in h1] == [h["test_delta"] for h in h2]
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_a_fused_checkpoint_resumes_like_an_uninterrupted_run_and_train_member_reads_it():
    config = TrainConfig(epochs=3)
    jobs = _jobs(config, sizes=(40, 33))
    whole = train_members(jobs)
    saved = {}

    def keep(reports):  # the states after epoch 1, as a checkpoint would hold them
        for name, metrics, state in reports:
            if metrics["epoch"] == 1:
                saved[name] = _saved(state).getvalue()

    short = [MemberJob(j.name, TrainConfig(epochs=1), j.x_train, j.x_test) for j in jobs]
    train_members(short, on_round=keep)
    resumed = train_members([MemberJob(j.name, config, j.x_train, j.x_test, _load(saved[j.name])) for j in jobs])
    for (m1, h1), (m2, h2) in zip(whole, resumed):
        assert [h["test_delta"] for h in h1] == pytest.approx([h["test_delta"] for h in h2], rel=1e-6)
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the checkpoint has train_member's format: the unfused path resumes it (to float tolerance: one member
    # alone steps with torch's default optimizer implementation, a pass with its fused one)
    m3, h3 = train_member(jobs[0].x_train, jobs[0].x_test, config, resume=_load(saved["m0"]))
    assert [h["epoch"] for h in h3] == [1, 2, 3]
    assert h3[-1]["test_delta"] == pytest.approx(whole[0][1][-1]["test_delta"], rel=1e-4)


def _saved(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf


def _load(blob: bytes) -> dict:
    """A fresh copy each time: a loaded optimizer state shares its tensors with the optimizer, which updates
    them in place."""
    return torch.load(io.BytesIO(blob), weights_only=True)


def test_passes_group_members_alike_and_respect_the_memory_bound():
    a, b = TrainConfig(epochs=2), TrainConfig(epochs=5, seed=3)  # epochs and seed may differ within a pass
    c = TrainConfig(optimizer="sgd")
    assert fusable(a) == fusable(b) != fusable(c)
    assert plan_passes([a, c, b, a, c]) == [[0, 2, 3], [1, 4]]
    assert plan_passes([a, c, b, a, c], per_pass=2) == [[0, 2], [3], [1, 4]]
    per_member = 4 * a.batch_size * activation_floats("lenet", "1x28x28")
    assert members_per_pass(a, 100, budget=3 * per_member) == 3
    assert members_per_pass(a, 100, budget=per_member // 2) == 1  # never fewer than one
    assert members_per_pass(a, 2, budget=10 * per_member) == 2
    assert members_per_pass(a, 100, "cuda") > members_per_pass(a, 100, "cpu")


def test_members_of_different_configs_are_refused_in_one_pass():
    x = np.zeros((4, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match="fusable"):
        train_members([MemberJob("a", TrainConfig(), x, x), MemberJob("b", TrainConfig(loss="issim"), x, x)])


def test_precision_is_recorded_when_not_fp32_and_checked():
    assert "precision" not in TrainConfig().to_dict()  # older manifests and run keys unchanged
    assert TrainConfig(precision="bf16").to_dict()["precision"] == "bf16"
    assert TrainConfig.from_dict(TrainConfig(precision="bf16").to_dict()).precision == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'; known: fp32, bf16"):
        TrainConfig(precision="fp16")


def test_bf16_scoring_is_fp32_scoring_to_bfloat16_rounding():
    from simex_ray.scoring import ScoringEngine

    torch.manual_seed(0)
    models = {f"m{k}": create_autoencoder("lenet") for k in range(3)}
    x = data.load("digits").x[:64]
    fp32 = ScoringEngine(models, {n: "mse" for n in models}).per_sample(x)
    bf16 = ScoringEngine(models, {n: "mse" for n in models}, precision="bf16").per_sample(x)
    assert not np.array_equal(fp32, bf16)  # really computed in bfloat16
    np.testing.assert_allclose(bf16, fp32, rtol=2e-2)


@pytest.mark.parametrize("members", [1, 3])
def test_bf16_training_trains(members):
    config = TrainConfig(epochs=2, precision="bf16")
    jobs = _jobs(config, sizes=(60, 50, 40)[:members])
    for (model, history), job in zip(train_members(jobs), jobs):
        assert history[-1]["test_delta"] < history[0]["test_delta"]  # it learns
        assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
