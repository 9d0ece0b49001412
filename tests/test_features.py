"""Classifier outputs computed once and cached (simex_ray.transfer.features; no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simex_ray.transfer.classifiers import LeNet5
from simex_ray.transfer.features import (ClassifierOutputs, FeatureCache, Outputs, check_layer, compute_outputs,
                                         data_fingerprint, default_cache_dir, row_digests)
from simex_ray.transfer.library import Classifier, Library, LibraryWriter
from simex_ray.transfer.selection import select


def write_library(out, seeds=(0, 1), fmt="1x28x28"):
    """A library of random-init LeNet-5s (no training: outputs only need fixed weights)."""
    writer = LibraryWriter(out)
    for s in seeds:
        torch.manual_seed(s)
        state = LeNet5(10, fmt).state_dict()
        writer.add(Classifier(name=f"digits@s{s}", spec="digits", seed=s, n_classes=10, fingerprint="f",
                              image_format=fmt), state)
    return out


@pytest.fixture
def lib(tmp_path):
    return Library.load(write_library(tmp_path / "lib"))


@pytest.fixture
def x():
    return np.random.default_rng(0).random((37, 1, 28, 28), dtype=np.float32)


@pytest.fixture
def forwards(monkeypatch):
    """How many batches went through any LeNet-5's convolutions (every forward pass does)."""
    calls = []
    original = LeNet5.forward_features

    def counted(self, t):
        calls.append(len(t))
        return original(self, t)

    monkeypatch.setattr(LeNet5, "forward_features", counted)
    return calls


def test_outputs_equal_the_library_calls_in_any_batch_size(lib, x):
    name = lib.names[0]
    out = compute_outputs(lib, name, x)
    np.testing.assert_array_equal(out.features, lib.features(name, x))
    np.testing.assert_array_equal(out.probabilities, lib.probabilities(name, x))
    small = compute_outputs(lib, name, x, batch_size=10)  # four batches, the last of 7: float rounding only
    np.testing.assert_allclose(small.features, out.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(small.probabilities, out.probabilities, rtol=1e-5, atol=1e-7)
    assert out.features.shape == (37, 84) and out.probabilities.shape == (37, 10) and out.layer == "penultimate"
    # The logits are the pre-softmax outputs of the same pass.
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(out.logits), 1).numpy(), out.probabilities, rtol=1e-6)
    # A named layer: that module's output, global-average-pooled when 4-D; the same logits.
    conv = compute_outputs(lib, name, x, layer="features.0", batch_size=16)
    assert conv.layer == "features.0" and conv.features.shape == (37, 6)
    with torch.no_grad():
        seen = []
        hook = lib.model(name).features[0].register_forward_hook(lambda m, a, o: seen.append(o))
        lib.model(name)(torch.as_tensor(x))
        hook.remove()
    np.testing.assert_allclose(conv.features, seen[0].mean(dim=(2, 3)).double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conv.probabilities, out.probabilities, rtol=1e-6, atol=1e-8)


def test_unknown_layer_is_a_one_line_usage_error(lib, x):
    from simex_ray.errors import UserError

    with pytest.raises(UserError, match=r"no module 'fc9'"):
        compute_outputs(lib, lib.names[0], x, layer="fc9")
    with pytest.raises(UserError, match="no module 'fc9'"):
        check_layer(lib, lib.names[0], "fc9")
    check_layer(lib, lib.names[0], "head.3")


def test_fingerprint_is_of_the_exact_images_and_the_same_from_slices(x):
    fp = data_fingerprint(row_digests(x), x.shape[1:])
    parts = np.concatenate([row_digests(x[:10]), row_digests(x[10:25]), row_digests(x[25:])])
    assert data_fingerprint(parts, x.shape[1:]) == fp  # workers hashing slices agree with one process
    y = x.copy()
    y[5, 0, 3, 3] = np.nextafter(y[5, 0, 3, 3], 2)
    assert data_fingerprint(row_digests(y), x.shape[1:]) != fp  # one ulp of one pixel
    assert data_fingerprint(row_digests(x[::-1]), x.shape[1:]) != fp  # the order
    assert data_fingerprint(row_digests(x[:-1]), x.shape[1:]) != fp


def test_a_cached_rerun_computes_no_forward_pass(lib, x, tmp_path, forwards):
    cache = FeatureCache(tmp_path / "cache")
    first = Outputs(lib, x, cache=cache)
    a = {n: first(n) for n in lib.names}
    assert forwards and all(not first.report[n]["cached"] for n in lib.names)
    assert first.report[lib.names[0]]["images_per_s"] > 0
    forwards.clear()
    again = Outputs(Library.load(lib.path), x, cache=cache)  # a new run: a fresh library, the same images
    b = {n: again(n) for n in lib.names}
    assert forwards == [] and all(again.report[n]["cached"] for n in lib.names)
    for n in lib.names:
        for k, v in a[n].arrays().items():
            np.testing.assert_array_equal(b[n].arrays()[k], v)
    # Every estimator reads the one record: select() through it runs no forward pass either.
    sel = select(again.library, x, methods=["entropy", "nuclear-norm", "silhouette"], outputs=again)
    assert forwards == []
    direct = select(Library.load(lib.path), x, methods=["entropy", "nuclear-norm", "silhouette"])
    for m, s in direct.scores.items():
        assert sel.scores[m] == pytest.approx(s, rel=1e-9, nan_ok=True)


def test_another_layer_weights_or_data_is_a_miss(lib, x, tmp_path, forwards):
    cache = FeatureCache(tmp_path / "cache")
    name, other = lib.names
    Outputs(lib, x, cache=cache)(name)
    forwards.clear()
    layer = Outputs(lib, x, cache=cache, layer="head.3")
    assert not layer.report and layer(name).features.shape == (37, 84) and not layer.report[name]["cached"]
    weights = Outputs(lib, x, cache=cache)
    weights(other)  # another classifier's weights (same spec, same data)
    assert not weights.report[other]["cached"]
    data = Outputs(lib, x[1:], cache=cache)
    data(name)
    assert not data.report[name]["cached"] and forwards
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4
    same = Outputs(lib, x.copy(), cache=cache)
    same(name)
    assert same.report[name]["cached"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "other-size", "garbage"])
def test_a_damaged_entry_is_computed_again_never_trusted(lib, x, tmp_path, forwards, damage, caplog):
    cache = FeatureCache(tmp_path / "cache")
    name = lib.names[0]
    good = Outputs(lib, x, cache=cache)(name)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    blob = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(blob[:len(blob) // 2])
    elif damage == "flip":  # one bit inside the features' bytes: the zip CRC or the entry's sha256 sees it
        i = blob.index(b"features.npy") + 400
        entry.write_bytes(blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:])
    elif damage == "other-size":  # a well-formed entry of 36 rows under this key
        short = ClassifierOutputs(good.features[:36], good.probabilities[:36], good.logits[:36])
        fp = data_fingerprint(row_digests(x), x.shape[1:])
        cache.put(lib.classifiers[name].sha256, fp, short)
        assert cache.get(lib.classifiers[name].sha256, fp, None, 36) is not None
    else:
        entry.write_bytes(b"not a zip file at all")
    forwards.clear()
    again = Outputs(lib, x, cache=cache)
    got = again(name)
    assert forwards and not again.report[name]["cached"]
    assert "computing it again" in caplog.text
    np.testing.assert_array_equal(got.features, good.features)
    assert Outputs(lib, x, cache=cache)(name) is not None  # rewritten: a hit now
    assert cache.get(lib.classifiers[name].sha256, again.fingerprint, None, len(x)) is not None


def test_a_cache_that_cannot_be_written_costs_a_recomputation_not_the_answer(lib, x, tmp_path, caplog):
    (tmp_path / "taken").write_text("a file, not a directory")
    out = Outputs(lib, x, cache=FeatureCache(tmp_path / "taken" / "cache"))
    np.testing.assert_array_equal(out(lib.names[0]).features, compute_outputs(lib, lib.names[0], x).features)
    assert "cannot write feature cache entry" in caplog.text


def test_default_cache_is_in_a_writable_local_library_only(tmp_path):
    lib = write_library(tmp_path / "lib", seeds=(0,))
    assert default_cache_dir(lib).path == str(lib / "features")
    assert default_cache_dir("s3://bucket/lib") is None
    assert default_cache_dir(lib.as_uri()).path == str(lib / "features")
    assert default_cache_dir(None) is None
    lib.chmod(0o555)
    try:
        import os

        if not os.access(lib, os.W_OK):  # root writes anywhere
            assert default_cache_dir(lib) is None
    finally:
        lib.chmod(0o755)


def test_simex_select_twice_computes_outputs_once_and_says_so(tmp_path, simex_here, forwards):
    import json

    lib = write_library(tmp_path / "lib")
    x = np.round(np.random.default_rng(1).random((50, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "u.npz", x=x)
    args = ["select", "--library", lib, "--data", f"npz:{tmp_path / 'u.npz'}", "--json"]
    first = simex_here(*args)
    a = json.loads(first.stdout)
    assert a["features"]["where"] == "here" and a["features"]["cache"] == str(lib / "features")
    assert {n: r["cached"] for n, r in a["features"]["classifiers"].items()} == {"digits@s0": False, "digits@s1": False}
    assert "features digits@s0: computed here" in first.stderr and "images/s" in first.stderr
    forwards.clear()
    again = simex_here(*args)
    b = json.loads(again.stdout)
    assert forwards == []  # no forward pass at all
    assert all(r["cached"] for r in b["features"]["classifiers"].values())
    assert "features digits@s1: from the cache" in again.stderr
    assert b["scores"] == a["scores"] and b["features"]["fingerprint"] == a["features"]["fingerprint"]
    # --feature-cache none computes again; another directory is a cold cache.
    c = json.loads(simex_here(*args, "--feature-cache", "none").stdout)
    assert c["features"]["cache"] is None and not any(r["cached"] for r in c["features"]["classifiers"].values())
    assert c["scores"] == a["scores"] and forwards
