"""The classifier library kept beside a ground truth (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simex_ray.protocol import ProtocolConfig, load_splits
from simex_ray.transfer.classifiers import LeNet5, predict_proba
from simex_ray.transfer.ground_truth import GroundTruth, compute_ground_truth
from simex_ray.transfer.library import Library, LibraryError, penultimate_features

REFS = ["digits", "bgrand:digits"]
TINY = ProtocolConfig(ae_epochs=1, clf_max_epochs=2, clf_patience=1, tl_configs=("TL-1",), seeds=(0, 1),
                      n_pairs=64, embedding_samples=100, test_samples=60)


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    gt = compute_ground_truth(REFS, samples=150, data_seed=0, model_seed=0, protocol=TINY)
    out = tmp_path_factory.mktemp("gt")
    gt.save(out)
    return out, gt


def test_the_ground_truth_keeps_every_base_classifier_as_a_library(gt):
    out, computed = gt
    loaded = GroundTruth.load(out)
    assert loaded.library == out / "library"
    lib = Library.load(loaded.library)
    assert lib.names == [f"{r}@s{s}" for s in (0, 1) for r in REFS]
    assert lib.references == REFS
    for (record, state), name in zip(computed.bases, lib.names):
        c = lib.classifiers[name]
        # The record says which data and settings made it, and how well it did on its own test split.
        split = load_splits(c.spec, samples=150, data_seed=0, protocol=TINY)
        assert c.fingerprint == split.fingerprints()["clf_train"]
        assert c.accuracy == pytest.approx(computed.base_accuracy[c.spec], abs=0.5)
        # The weights are exactly the trained ones: same outputs as a model built from the state.
        model = LeNet5(c.n_classes)
        model.load_state_dict(state)
        x = split.ae_test[:20]
        np.testing.assert_allclose(lib.probabilities(name, x), predict_proba(model, x), rtol=1e-6)
        assert lib.features(name, x).shape == (20, 84)
        np.testing.assert_allclose(lib.features(name, x), penultimate_features(model, x))


def test_a_library_weight_file_that_changed_is_refused_in_one_line(gt, tmp_path):
    import shutil

    out, _ = gt
    copy = tmp_path / "lib"
    shutil.copytree(out / "library", copy)
    lib = Library.load(copy)
    name = lib.names[0]
    path = copy / lib.classifiers[name].weights
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(LibraryError, match="corrupted .sha256 mismatch.") as e:
        Library.load(copy).model(name)
    assert "\n" not in str(e.value)
    (copy / "library.json").write_text("{not json")
    with pytest.raises(LibraryError, match="corrupted"):
        Library.load(copy)
    with pytest.raises(LibraryError, match="simex train-bases"):
        Library.load(tmp_path / "nowhere")


def test_saving_again_writes_no_new_weight_files(gt, tmp_path):
    out, computed = gt
    computed.save(tmp_path)
    first = sorted(p.name for p in (tmp_path / "library" / "weights").iterdir())
    computed.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "library" / "weights").iterdir()) == first
    doc = json.loads((tmp_path / "library" / "library.json").read_text())
    assert doc["kind"] == "simex-classifier-library" and len(doc["classifiers"]) == len(first) == 4


def test_a_ground_truth_written_before_libraries_still_loads(gt, tmp_path):
    import shutil

    out, _ = gt
    shutil.copy(out / "ground_truth.json", tmp_path / "ground_truth.json")
    old = GroundTruth.load(tmp_path)
    assert old.library is None
    np.testing.assert_array_equal(old.accuracy, GroundTruth.load(out).accuracy)
