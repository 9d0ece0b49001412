"""The baseline classifiers follow the image format: LeNet-5 and ResNet-18 at any (C, H, W), the paper's
1×28×28 unchanged, and the transfer ground truth, library and selection run on colour data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.formats import LEGACY, FormatError, ImageFormat, resize
from simex_ray.protocol import ProtocolConfig, Splits
from simex_ray.transfer.classifiers import (LeNet5, ResNet18, Resize, image_format_of, leave_one_class_out,
                                            make_classifier, predict_proba, train_base)
from simex_ray.transfer.ground_truth import compute_ground_truth
from simex_ray.transfer.learning import finetune, transfer
from simex_ray.transfer.library import Classifier, Library, LibraryError, LibraryWriter
from simex_ray.transfer.selection import select

FORMATS = ["1x28x28", "1x32x32", "3x32x32", "3x64x48", "1x16x16"]
COLOUR = ImageFormat(3, 32, 32)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: torch.nn.Module, fmt: ImageFormat, seed: int = 1) -> torch.Tensor:
    x = torch.rand(3, *fmt.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_a_legacy_lenet5_is_the_papers():
    torch.manual_seed(0)
    default = LeNet5(10)
    torch.manual_seed(0)
    legacy = LeNet5(10, "1x28x28")
    torch.manual_seed(0)
    by_name = make_classifier("lenet5", 10)
    # conv 156 + conv 2416 + FC 48120 + FC 10164 + FC 850: LeNet-5 on 28x28 padded by 2 (= 32x32)
    assert n_params(default) == 61706
    assert list(default.state_dict()) == ["features.0.weight", "features.0.bias", "features.3.weight",
                                          "features.3.bias", "head.1.weight", "head.1.bias", "head.3.weight",
                                          "head.3.bias", "head.5.weight", "head.5.bias"]
    assert default.features[0].padding == (2, 2) and isinstance(default.resize, torch.nn.Identity)
    for other in (legacy, by_name):
        torch.testing.assert_close(outputs(other, LEGACY), outputs(default, LEGACY), rtol=0, atol=0)


def test_a_legacy_resnet18_is_unchanged():
    torch.manual_seed(0)
    default = ResNet18(10, stem_stride=2)
    torch.manual_seed(0)
    by_name = make_classifier("resnet18", 10, LEGACY, stem_stride=2)
    assert default.net.conv1.in_channels == 1 and default.net.conv1.stride == (2, 2)
    torch.testing.assert_close(outputs(by_name, LEGACY), outputs(default, LEGACY), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lenet5_takes_every_format_with_one_head(fmt):
    fmt = ImageFormat.parse(fmt)
    model = LeNet5(7, fmt)
    x = torch.rand(4, *fmt.shape)
    assert model.forward_features(x).shape == (4, 16, 5, 5)  # LeNet-5's 32x32 input at every format
    assert model(x).shape == (4, 7)
    assert model.features[0].weight.shape == (6, fmt.channels, 5, 5)
    legacy = LeNet5(7).state_dict()
    state = model.state_dict()
    assert list(state) == list(legacy)  # the resize matrices are not weights
    assert all(state[k].shape == legacy[k].shape for k in state if not k.startswith("features.0."))
    assert model.image_format == fmt


@pytest.mark.parametrize("fmt", ["3x32x32", "1x16x16", "3x28x40"])
def test_resnet18_takes_every_format(fmt):
    fmt = ImageFormat.parse(fmt)
    model = ResNet18(5, stem_stride=2, image_format=fmt)
    assert model.net.conv1.in_channels == fmt.channels
    assert outputs(model, fmt).shape == (3, 5)


def test_lenet5_resizes_by_the_one_conversion_rule():
    fmt = ImageFormat(3, 64, 48)  # shrink the height (area), grow nothing, shrink the width (area)
    x = np.random.default_rng(0).random((2, *fmt.shape), dtype=np.float32)
    ours = Resize(fmt, 32, 32)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, resize(x, 32, 32), atol=1e-6)
    small = ImageFormat(1, 16, 20)  # bilinear when growing
    y = np.random.default_rng(1).random((2, *small.shape), dtype=np.float32)
    np.testing.assert_allclose(Resize(small, 32, 32)(torch.from_numpy(y)).numpy(), resize(y, 32, 32), atol=1e-6)


def test_a_format_is_inferred_from_the_images_or_checked_against_them():
    x = np.zeros((2, 3, 32, 32), np.float32)
    assert image_format_of(x) == COLOUR and image_format_of(torch.from_numpy(x), "3x32x32") == COLOUR
    with pytest.raises(FormatError, match="images are 3x32x32 but the classifier takes 1x28x28"):
        image_format_of(x, LEGACY)


@pytest.fixture(scope="module")
def colour_splits():
    """digits in 3x32x32 (grey repeated, bilinear 8->32), 200 samples: classifier train / val / test."""
    train, test = data.prepare("digits", samples=200, seed=0, fmt=COLOUR)
    fit, val = data.train_test_split(train, 0.2, seed=0)
    assert fit.x.shape[1:] == (3, 32, 32)
    return {"x_train": fit.x, "y_train": fit.y, "x_val": val.x, "y_val": val.y, "x_test": test.x, "y_test": test.y}


@pytest.fixture(scope="module")
def colour_base(colour_splits):
    return train_base(**colour_splits, max_epochs=2, patience=1, seed=0)


def test_a_base_classifier_trains_on_colour_images(colour_base, colour_splits):
    assert colour_base["image_format"] == "3x32x32"
    assert colour_base["state"]["features.0.weight"].shape == (6, 3, 5, 5)
    model = LeNet5(10, colour_base["image_format"])
    model.load_state_dict(colour_base["state"])
    p = predict_proba(model, colour_splits["x_test"])
    assert p.shape == (len(colour_splits["y_test"]), 10)
    assert 0.0 <= colour_base["test_accuracy"] <= 1.0


def test_transfer_and_finetune_run_on_colour_images(colour_base, colour_splits):
    out = transfer(colour_base["state"], **colour_splits, max_epochs=1, patience=1, seed=0)
    assert 0.0 <= out["accuracy"] <= 1.0 and out["n_test"] == len(colour_splits["y_test"])
    tuned = finetune(colour_base["state"], **colour_splits, epochs=1, seed=0)
    scratch = finetune(None, **colour_splits, epochs=1, seed=0)
    assert 0.0 <= tuned["accuracy"] <= 1.0 and scratch["from_scratch"]


def test_a_base_of_other_channels_than_the_images_fails_in_one_line(colour_base, colour_splits):
    grey = {k: (v[:, :1] if k.startswith("x_") else v) for k, v in colour_splits.items()}  # 1x32x32
    with pytest.raises(ValueError, match="3-channel images but X is 1x32x32") as e:
        transfer(colour_base["state"], **grey, max_epochs=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("architecture, kw", [("lenet5", {}), ("resnet18", {"stem_stride": 2})])
def test_leave_one_class_out_on_colour_images(architecture, kw):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    x = rng.random((len(y), 3, 16, 16), dtype=np.float32) * 0.2
    x[np.arange(len(y)), y] += 0.8  # the class is the bright channel
    out = leave_one_class_out(architecture, 1, x, y, x, y, x, y, n_classes=3, max_epochs=1, patience=1,
                              batch_size=8, model_kw=kw)
    assert np.isnan(out["probability"][1]) and out["architecture"] == architecture
    with pytest.raises(FormatError, match="takes 1x28x28"):
        leave_one_class_out(architecture, 1, x, y, x, y, x, y, n_classes=3, max_epochs=1,
                            model_kw={**kw, "image_format": "1x28x28"})


def test_a_colour_library_round_trips_and_refuses_other_formats(colour_base, colour_splits, tmp_path):
    record = Classifier(name="digits@s0", spec="digits", seed=0, n_classes=10, fingerprint="f",
                        image_format=colour_base["image_format"])
    LibraryWriter(tmp_path / "lib").add(record, colour_base["state"])
    lib = Library.load(tmp_path / "lib")
    assert lib.image_format("digits@s0") == COLOUR
    x = colour_splits["x_test"][:5]
    assert lib.features("digits@s0", x).shape == (5, 84)
    memory = Library.in_memory([(record, colour_base["state"])])
    np.testing.assert_allclose(lib.probabilities("digits@s0", x), memory.probabilities("digits@s0", x), rtol=1e-6)
    with pytest.raises(FormatError, match="images are 1x28x28 but classifier 'digits@s0' takes 3x32x32") as e:
        lib.probabilities("digits@s0", np.zeros((2, 1, 28, 28), np.float32))
    assert "\n" not in str(e.value)
    with pytest.raises(LibraryError, match="unknown classifier 'mnist@s0'"):
        lib.features("mnist@s0", x)
    # a record written before formats existed reads as the paper's format
    old = {k: v for k, v in record.to_json().items() if k != "image_format"}
    assert Classifier.from_json(old).image_format == "1x28x28"


def colour_load_splits(spec: str, protocol: ProtocolConfig, fmt: ImageFormat) -> Splits:
    """protocol.load_splits with the data loaded in ``fmt`` (what a format-aware load_splits does)."""
    from simex_ray.transfer.classifiers import first_classes, first_labels

    train, test = data.prepare(spec, samples=150, seed=0, test_samples=protocol.test_samples, fmt=fmt)
    out = Splits(train.spec, train.x, test.x, ae_train_fingerprint=data.fingerprint(train))
    labels = first_labels(train, protocol.n_classes)
    ctrain, ctest = (first_classes(d, protocol.n_classes, labels) for d in (train, test))
    fit, val = data.train_test_split(ctrain, protocol.val_fraction, seed=0)
    out.clf = {"train": (fit.x, fit.y), "val": (val.x, val.y), "test": (ctest.x, ctest.y)}
    return out


def test_the_ground_truth_library_and_selection_run_on_colour_data():
    refs = ["digits", "bgrand:digits"]
    tiny = ProtocolConfig(ae_epochs=1, clf_max_epochs=1, clf_patience=1, tl_configs=("TL-1",), seeds=(0,),
                          n_pairs=64, embedding_samples=100, test_samples=60)
    splits = {r: colour_load_splits(r, tiny, COLOUR) for r in refs}
    gt = compute_ground_truth(refs, samples=150, data_seed=0, protocol=tiny, splits=splits)
    assert gt.accuracy.shape == (2, 2) and np.isfinite(gt.accuracy).all()
    assert {record.image_format for record, _ in gt.bases} == {"3x32x32"}
    lib = Library.in_memory(gt.bases)
    x, y = splits["bgrand:digits"].clf["test"]
    sel = select(lib, x, y, methods=["logme", "nce"])
    assert set(sel.scores["logme"]) == set(lib.names)
