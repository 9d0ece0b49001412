"""The scoring engine (fused = naive), calibrated rankings, composition, per-sample answers (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.fleet import (QUANTILES, Fleet, FleetError, Member, calibration_of, percentile_in, read_manifest,
                             score_result)
from simex_ray.losses import per_sample_delta
from simex_ray.models import create_autoencoder
from simex_ray import scoring
from simex_ray.scoring import FusedLeNet, ScoringEngine, delta_per_member, resolve_device


def _models(k, arch="lenet"):
    torch.manual_seed(0)
    return {f"m{i}": create_autoencoder(arch).eval() for i in range(k)}


@pytest.mark.parametrize("loss", ["mse", "issim"])
def test_fused_engine_equals_each_member_alone(loss):
    models = _models(4)
    x = np.random.default_rng(0).random((70, 1, 28, 28)).astype(np.float32)
    fused = ScoringEngine(models, {n: loss for n in models}, chunk=32).per_sample(x)
    with torch.no_grad():
        naive = np.stack([per_sample_delta(torch.from_numpy(x), m(torch.from_numpy(x)), loss).double().numpy()
                          for m in models.values()])
    assert fused.shape == (4, 70)
    np.testing.assert_allclose(fused, naive, rtol=2e-5, atol=1e-7)


def test_a_fleet_past_the_pass_limit_runs_as_several_fused_passes_with_the_same_values(monkeypatch):
    # the limit keeps every block below glibc's per-thread heap (off the main thread, bigger ones are mmapped
    # afresh each pass): here a 32-image pass holds 2 members' conv1 outputs, so 5 members take 3 passes
    models = _models(5)
    x = np.random.default_rng(3).random((40, 1, 28, 28)).astype(np.float32)
    whole = ScoringEngine(models, {n: "mse" for n in models}, chunk=32).per_sample(x)
    monkeypatch.setattr(scoring, "PASS_FLOATS_ALL", 2 * 32 * 6 * 28 * 28)
    e = ScoringEngine(models, {n: "mse" for n in models}, chunk=32)
    split = e.per_sample(x, names=["m4", "m0", "m3", "m1", "m2"])
    assert [g.names for g in e._plan(("m4", "m0", "m3", "m1", "m2"), None)] == [["m4", "m0"], ["m3", "m1"], ["m2"]]
    np.testing.assert_allclose(split, whole[[4, 0, 3, 1, 2]], rtol=1e-6)
    one = FusedLeNet(list(models.values())[:1])
    assert scoring.members_per_pass(one, 5, 32, torch.device("cpu")) == 2
    assert scoring.members_per_pass(one, 5, 32, torch.device("cuda")) == 5  # no glibc arenas on a GPU
    assert scoring.members_per_pass(one, 5, 10_000, torch.device("cpu")) == 1


@pytest.mark.parametrize("n,d", [(50, 10), (4096, 84), (30, 128), (200, 1)])
def test_latent_moments_equal_scikit_learns_ledoit_wolf(n, d):
    """fit_moments is LedoitWolf().fit in numpy (training processes skip sklearn's import): the same location
    and precision, with fewer codes than dimensions and a code direction that never varies."""
    from sklearn.covariance import LedoitWolf

    from simex_ray.fleet.latent import fit_moments

    rng = np.random.default_rng(d)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
    if d > 3:
        x[:, 2] = 1.0
    lw = LedoitWolf().fit(x)
    mean, precision = fit_moments(x)
    np.testing.assert_allclose(mean, lw.location_, rtol=1e-12)
    np.testing.assert_allclose(precision, lw.precision_, rtol=1e-9, atol=1e-12 * np.abs(lw.precision_).max())


@pytest.mark.parametrize("arch,fmt,loss", [("lenet", "1x28x28", "mse"), ("conv", "3x32x32", "issim")])
def test_latent_distances_of_the_fused_pass_equal_each_member_encoded_alone(arch, fmt, loss):
    """z from the codes inside the fused pass (one batched matmul) = encode(x) per member, then numpy's
    Mahalanobis under sklearn's Ledoit-Wolf moments; δ unchanged; a member without moments gets NaN."""
    from simex_ray.fleet.latent import encode_all, fit_moments, latent_distance
    from simex_ray.formats import ImageFormat

    torch.manual_seed(0)
    f = ImageFormat.parse(fmt)
    models = {f"m{i}": create_autoencoder(arch, f).eval() for i in range(3)}
    rng = np.random.default_rng(0)
    train, x = rng.random((300, *f.shape)).astype(np.float32), rng.random((45, *f.shape)).astype(np.float32)
    moments = {n: fit_moments(encode_all(m, train * (0.5 + 0.2 * k))) for k, (n, m) in enumerate(models.items())
               if n != "m1"}
    losses = {n: loss for n in models}
    plain = ScoringEngine(models, losses, chunk=16).per_sample(x)
    for fused in (True, False):
        both = ScoringEngine(models, losses, chunk=16, fused=fused, moments=moments).per_sample(x, latent=True)
        assert both.shape == (3, 2, 45)
        np.testing.assert_allclose(both[:, 0], plain, rtol=2e-5, atol=1e-7)
        assert np.isnan(both[1, 1]).all()
        for n in ("m0", "m2"):
            k = list(models).index(n)
            want = latent_distance(encode_all(models[n], x), *moments[n])
            np.testing.assert_allclose(both[k, 1], want, rtol=1e-4)
    assert np.all(want > 0)


def test_fused_lenet_reconstructs_like_each_autoencoder():
    models = list(_models(3).values())
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out = FusedLeNet(models)(x)
        for k, m in enumerate(models):
            torch.testing.assert_close(out[:, k:k + 1], m(x), rtol=1e-5, atol=1e-6)


def test_issim_of_many_members_equals_pytorch_msssim():
    x, y = torch.rand(6, 1, 28, 28), torch.rand(6, 3, 28, 28)
    ours = delta_per_member(x, y, "issim")
    for k in range(3):
        torch.testing.assert_close(ours[:, k], per_sample_delta(x, y[:, k:k + 1], "issim"), rtol=1e-5, atol=1e-6)


def test_mixed_architectures_and_losses_are_grouped():
    models = {**_models(2), "mlp": create_autoencoder("mlp").eval()}
    losses = {"m0": "mse", "m1": "issim", "mlp": "mse"}
    x = np.random.default_rng(1).random((20, 1, 28, 28)).astype(np.float32)
    got = ScoringEngine(models, losses, chunk=8).per_sample(x, names=["mlp", "m1", "m0"])
    with torch.no_grad():
        for row, name in zip(got, ["mlp", "m1", "m0"]):
            t = torch.from_numpy(x)
            np.testing.assert_allclose(row, per_sample_delta(t, models[name](t), losses[name]).numpy(),
                                       rtol=2e-5, atol=1e-7)
    with pytest.raises(KeyError, match="unknown member"):
        ScoringEngine(models, losses).per_sample(x, names=["nope"])


def test_engine_streams_blocks_and_chunks_give_the_same_values():
    models = _models(2)
    x = np.random.default_rng(2).random((50, 1, 28, 28)).astype(np.float32)
    e = ScoringEngine(models, {n: "mse" for n in models}, chunk=16)
    whole = e.per_sample(x)
    blocks = np.concatenate(list(e.iter_chunks(iter([x[:13], x[13:40], x[40:]]))), axis=1)
    np.testing.assert_allclose(blocks, whole, rtol=1e-6)


def _mixed_batches():
    """Host batches as loops meet them: uint8 and float arrays of different sizes, a float64 one, a tensor."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8), rng.random((3, 3, 8, 8), dtype=np.float32),
            rng.random((4, 3, 8, 8)), torch.rand(2, 3, 8, 8), rng.integers(0, 256, (1, 3, 8, 8), dtype=np.uint8)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (pinned memory, a side stream)"))])
def test_prefetch_hands_out_every_batch_in_order_with_the_same_values(device):
    from simex_ray.device import prefetch

    batches = _mixed_batches()
    got = list(prefetch(iter(batches), device))  # from a generator, as the loops hand them
    assert len(got) == len(batches)
    for g, b in zip(got, batches):
        want = torch.as_tensor(np.asarray(b, dtype=np.float32))  # the values as given: uint8 stays 0..255
        assert g.device.type == device and g.dtype == torch.float32
        torch.testing.assert_close(g.cpu(), want, rtol=0, atol=0)
    assert list(prefetch(iter([]), device)) == []
    if device == "cuda":  # the engine fed through it scores as it does on the CPU
        models = {f"m{k}": create_autoencoder("lenet", "1x28x28") for k in range(2)}
        x = np.random.default_rng(1).random((70, 1, 28, 28), dtype=np.float32)
        cpu = ScoringEngine(models, {n: "mse" for n in models}, chunk=32).per_sample(x)
        gpu = ScoringEngine(models, {n: "mse" for n in models}, chunk=32, device="cuda").per_sample(x)
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-6)


def test_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="known: cpu, cuda, auto"):
        resolve_device("tpu")
    # "auto" is cuda exactly when torch sees a GPU; "cuda" without one is a one-line error naming the fix.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError) as err:
            resolve_device(name)
        message = str(err.value)
        assert "\n" not in message and "no CUDA device" in message and "--device cpu" in message


def _member(name, own):
    return Member(name=name, spec=name, config={"loss": "mse", "architecture": "lenet"}, fingerprint="",
                  metrics={"ref_mean_l2": 1.0}, calibration=calibration_of(own))


def test_calibration_sketch_and_percentiles():
    own = np.linspace(0.0, 1.0, 1001)
    c = calibration_of(own)
    assert len(c["quantiles"]) == len(QUANTILES) == 101 and c["mean"] == pytest.approx(0.5) and c["n"] == 1001
    np.testing.assert_allclose(percentile_in(c, np.array([-1.0, 0.25, 0.95, 2.0])), [0.0, 0.25, 0.95, 1.0],
                               atol=1e-9)


def test_calibrated_ranking_corrects_references_of_different_difficulty():
    """A reference whose own data reconstructs easily (small own Δ) looks near to everything in raw Δ."""
    rng = np.random.default_rng(0)
    hard = _member("hard", rng.normal(0.10, 0.01, 500))   # its own unseen data: Δ 0.10
    easy = _member("easy", rng.normal(0.04, 0.005, 500))  # its own unseen data: Δ 0.04
    # Unknown data that IS like "hard" (Δ 0.10 through it) but reconstructs fairly well through "easy" (0.08).
    d = np.stack([rng.normal(0.10, 0.01, 200), rng.normal(0.08, 0.01, 200)])
    r = score_result(d, [hard, easy], "mse", method="calibrated")
    assert r.ranking_raw == ["easy", "hard"]                  # raw Δ is fooled
    assert r.ranking == ["hard", "easy"] and r.method == "calibrated"
    assert r.delta_calibrated["hard"] == pytest.approx(d[0].mean() / hard.calibration["mean"])
    assert r.in_distribution["hard"] > 0.8 and r.in_distribution["easy"] < 0.01
    assert r.ranking_by("in_distribution") == ["hard", "easy"] and r.ranking_by("typicality") == ["hard", "easy"]
    assert r.typicality["hard"] == pytest.approx(abs(np.log(r.delta_calibrated["hard"])))
    assert r.composition["hard"] > 0.9


def test_composition_of_a_half_and_half_mixture():
    rng = np.random.default_rng(1)
    a, b = _member("a", rng.normal(0.05, 0.01, 500)), _member("b", rng.normal(0.05, 0.01, 500))
    like_a = np.stack([rng.normal(0.05, 0.01, 100), rng.normal(0.2, 0.02, 100)])
    like_b = like_a[::-1]
    r = score_result(np.concatenate([like_a, like_b], axis=1), [a, b], "mse", keep_per_sample=True)
    assert r.composition == pytest.approx({"a": 0.5, "b": 0.5}, abs=0.02)
    table = r.per_sample_table(["a", "b"], labels=np.r_[np.zeros(100), np.ones(100)])
    assert len(table) == 200 and (table["nearest"][:100] == "a").mean() > 0.97
    assert {"index", "label", "delta/a", "delta/b", "nearest", "nearest_distribution"} <= set(table.columns)


def test_uncalibrated_members_fall_back_to_raw_and_go_last():
    old = Member(name="old", spec="old", config={"loss": "mse", "architecture": "lenet"}, fingerprint="")
    r = score_result(np.array([[0.1, 0.2]]), [old], "mse", method="calibrated")
    assert r.method == "raw" and r.delta_calibrated == {"old": None} and r.ranking == ["old"]


def test_trained_fleets_carry_their_calibration(tiny_fleet):
    from simex_ray.fleet.latent import LATENT_SAMPLES, encode_all, fit_moments
    from simex_ray.fleet.manifest import read_moments

    fleet = Fleet.load(tiny_fleet)
    for m in fleet.members.values():
        assert len(m.calibration["quantiles"]) == 101 and m.calibration["n"] == m.n_test
        assert m.calibration["mean"] == pytest.approx(m.metrics["test_delta"], rel=1e-4)
        assert m.latent["n_fit"] == min(m.n_train, LATENT_SAMPLES) and m.latent["n"] == m.n_test
        assert m.latent["file"].endswith(f"-{m.latent['sha256'][:16]}.pt")  # content-addressed like the weights
    train, test = data.prepare("digits", samples=300, seed=0)
    mu, p = read_moments(tiny_fleet, fleet.members["digits"])  # the training split's codes, refitted here
    np.testing.assert_allclose(mu, fit_moments(encode_all(fleet.models["digits"], train.x))[0], rtol=1e-6, atol=1e-9)
    r = fleet.score(test.x)
    assert r.delta_calibrated["digits"] == pytest.approx(1.0, rel=1e-4)  # it IS the reference's own test split
    assert r.latent_calibrated["digits"] == pytest.approx(1.0, rel=1e-4)
    assert r.method == "typicality_latent" and r.typicality_latent["digits"] == pytest.approx(0.0, abs=1e-3)
    assert r.ranking[0] == "digits" and r.composition["digits"] > 0.9


def test_a_fleet_without_latent_moments_loads_and_scores_as_before(tiny_fleet, tmp_path):
    import shutil

    old = shutil.copytree(tiny_fleet, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    for m in manifest["members"]:
        del m["latent"]  # as written before latent moments existed
    (old / "manifest.json").write_text(json.dumps(manifest))
    _, test = data.prepare("bgrand:digits", samples=300, seed=0)
    now, before = Fleet.load(tiny_fleet).score(test.x).to_json(), Fleet.load(old).score(test.x).to_json()
    assert before["ranking_method"] == "distribution" and now["ranking_method"] == "typicality_latent"
    assert set(before["latent_calibrated"].values()) == {None} == set(before["typicality_latent"].values())
    for key in ("delta", "distribution", "typicality", "ranking_distribution", "composition"):
        assert before[key] == now[key]
    # `simex train` on it again retrains nothing and adds the moments the fleet would have had
    from simex_ray.fleet.plan import FleetWriter, plan_fleet
    from simex_ray.training import TrainConfig

    plans = plan_fleet(["digits", "bgrand:digits"], TrainConfig(epochs=2), samples=300, seed=0)
    assert FleetWriter(old).pending(plans) == []
    added = {m["name"]: m["latent"] for m in json.loads((old / "manifest.json").read_text())["members"]}
    for m in Fleet.load(tiny_fleet).members.values():
        assert added[m.name]["sha256"] == m.latent["sha256"]  # the same moments, bit for bit
        assert added[m.name]["own_mean"] == pytest.approx(m.latent["own_mean"], rel=1e-9)
    assert Fleet.load(old).score(test.x).to_json()["typicality_latent"] == pytest.approx(now["typicality_latent"])


def test_a_manifest_from_a_newer_format_is_refused(tiny_fleet, tmp_path):
    import shutil

    f = tmp_path / "F"
    shutil.copytree(tiny_fleet, f)
    manifest = read_manifest(f)
    (f / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(FleetError, match="format 99, newer than this simex reads"):
        Fleet.load(f)


def test_typicality_is_two_sided():
    """Data that reconstructs much better than a reference's own (smooth, easy images) is not like it."""
    rng = np.random.default_rng(2)
    hard, easy = _member("hard", rng.normal(0.10, 0.01, 500)), _member("easy", rng.normal(0.02, 0.003, 500))
    d = np.stack([rng.normal(0.03, 0.005, 200), rng.normal(0.02, 0.003, 200)])  # easy-like data
    r = score_result(d, [hard, easy], "mse", method="typicality")
    assert r.ranking_by("calibrated") == ["hard", "easy"]  # one-sided: "better than its own" looks nearest
    assert r.ranking == ["easy", "hard"] and r.composition["easy"] > 0.8


def test_the_allocator_setting_is_kept_to_processes_that_score(tmp_path):
    """An engine built in any process (training, experiments, a library user's) leaves glibc's thresholds alone;
    `simex score` sets them for itself."""
    import subprocess
    import sys

    probe = ("import sys, numpy as np, torch; import simex_ray.scoring as s; from simex_ray.models import "
             "create_autoencoder; e = s.ScoringEngine({'a': create_autoencoder()}, {'a': 'mse'}); "
             "e.per_sample(np.zeros((2, 1, 28, 28), np.float32)); before = s._MEMORY_KEPT; "
             "from simex_ray.cli.main import main; main(sys.argv[1:]); print('kept', before, s._MEMORY_KEPT)")
    from simex_ray.fleet.build import build_fleet_local
    from simex_ray.training import TrainConfig

    build_fleet_local(["digits"], tmp_path / "F", TrainConfig(epochs=1), samples=60)
    out = subprocess.run([sys.executable, "-c", probe, "score", "--fleet", str(tmp_path / "F"), "--data", "digits",
                          "--samples", "60"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "kept False True" in out.stdout
