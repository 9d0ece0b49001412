"""The classifier library kept beside a ground truth (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
        with torch.no_grad():  # the 84-dim FC layer after its activation, the input of the last Linear
            np.testing.assert_array_equal(lib.features(name, x),
                                          model.head[:-1](model.forward_features(torch.from_numpy(x))).double())


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


# The record fields of format 1, as simex wrote them before classifiers could be added (LeNet-5 only).
FORMAT_1_FIELDS = ("name", "spec", "seed", "n_classes", "fingerprint", "architecture", "image_format", "data_seed",
                   "samples", "config", "accuracy", "val_accuracy", "seconds", "weights", "sha256")


def test_a_format_1_library_loads_scores_the_same_and_takes_added_classifiers(gt, tmp_path):
    import shutil

    from simex_ray.transfer.library import add_classifier
    from simex_ray.transfer.selection import select

    out, computed = gt
    old = tmp_path / "old"
    shutil.copytree(out / "library", old)
    doc = json.loads((old / "library.json").read_text())
    doc.update(format=1, refs=REFS, classifiers=[{k: c[k] for k in FORMAT_1_FIELDS} for c in doc["classifiers"]])
    (old / "library.json").write_text(json.dumps(doc, indent=2))
    split = load_splits("rotated:digits", samples=150, data_seed=0, protocol=TINY)
    x, y = split.clf["train"]
    methods = ["logme", "knn", "leep", "entropy"]
    reference = select(Library.in_memory(computed.bases), x, y, methods=methods).scores
    assert select(Library.load(old), x, y, methods=methods).scores == reference
    # Adding to it keeps every record and key, and writes format 2.
    record, state = computed.bases[0]
    torch.save(state, tmp_path / "mine.pt")
    add_classifier(old, arch="lenet5", weights=tmp_path / "mine.pt", n_classes=10, source="digits")
    doc = json.loads((old / "library.json").read_text())
    assert doc["format"] == 2 and doc["refs"] == REFS
    lib = Library.load(old)
    assert lib.names == [*reference["knn"], "mine"] and lib.references == REFS
    assert select(lib, x, y, methods=methods).scores["knn"] == {**reference["knn"],
                                                                "mine": reference["knn"][record.name]}
