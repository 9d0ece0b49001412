"""Your own model zoo in a classifier library: `simex library add|list`, any torchvision / TorchScript
classifier's features and softmax, and `simex select` over a mixed library (no Ray)."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from simex_ray.transfer.classifiers import LeNet5
from simex_ray.transfer.library import Classifier, Library, LibraryError
from simex_ray.transfer.selection import top_references

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def tiny_net() -> nn.Module:
    """Flatten -> Linear -> ReLU -> Linear: its penultimate features are known in closed form."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 24), nn.ReLU(), nn.Linear(24, 10)).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Weight files made here: a torchvision MobileNetV3-small (.pt and .safetensors), a TorchScript archive
    and a LeNet-5 state_dict; nothing downloaded."""
    import torchvision
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    mnv3 = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=10).eval()
    torch.save(mnv3.state_dict(), d / "mnv3.pt")
    save_file(mnv3.state_dict(), d / "mnv3-b.safetensors")
    net = tiny_net()
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x, and still what zoos hold
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net), d / "tiny.pt")
    lenet = LeNet5(10)
    torch.save(lenet.state_dict(), d / "lenet.pt")
    torch.save(mnv3, d / "pickled.pt")  # a whole pickled module: never unpickled
    return {"dir": d, "mnv3": mnv3, "tiny": net, "lenet": lenet.eval()}


@pytest.fixture(scope="module")
def library(zoo, tmp_path_factory):
    from simex_ray.cli import main

    lib, d = tmp_path_factory.mktemp("lib") / "lib", zoo["dir"]
    common = ("--library", lib, "--num-classes", 10)
    for args in (("--arch", "torchvision:mobilenet_v3_small", "--weights", d / "mnv3.pt", "--image-format", "3x32x32",
                  "--source", "digits"),
                 ("--arch", "torchvision:mobilenet_v3_small", "--weights", d / "mnv3-b.safetensors", "--image-format",
                  "3x32x32", "--layer", "avgpool", "--source", "digits"),
                 ("--arch", "torchscript", "--weights", f"file://{d / 'tiny.pt'}", "--image-format", "3x32x32",
                  "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))),
                 ("--arch", "lenet5", "--weights", d / "lenet.pt", "--name", "lenet", "--source", "rotated:digits")):
        assert main(["library", "add", *map(str, common), *map(str, args)]) == 0
    return lib


def images(fmt=(3, 32, 32), n=6):
    return np.random.default_rng(0).random((n, *fmt)).astype(np.float32)


def test_added_classifiers_are_listed_with_their_records(library, simex_here):
    out = json.loads(simex_here("library", "list", "--library", library, "--json").stdout)
    records = {c["name"]: c for c in out["classifiers"]}
    assert out["format"] == 2 and list(records) == ["mnv3", "mnv3-b", "tiny", "lenet"]
    assert records["mnv3"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's, by default
    assert records["mnv3"]["spec"] == "digits" and records["tiny"]["spec"] == "tiny"  # no --source: its own
    assert records["tiny"]["mean"] == MEAN and records["lenet"]["mean"] is None
    assert records["lenet"]["image_format"] == "1x28x28" and records["mnv3-b"]["layer"] == "avgpool"
    assert records["mnv3-b"]["weights"].endswith(".safetensors") and records["tiny"]["origin"].startswith("file://")
    table = simex_here("library", "list", "--library", library).stdout
    assert "torchvision:mobilenet_v3_small" in table and "torchscript" in table


def test_features_and_softmax_are_the_networks_own(zoo, library):
    lib = Library.load(library)
    x = images()
    mnv3 = zoo["mnv3"]
    normed = (torch.from_numpy(x) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    seen = {}
    hooks = [mnv3.classifier[3].register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0])),
             mnv3.avgpool.register_forward_hook(lambda m, a, out: seen.__setitem__("avgpool", out))]
    with torch.no_grad():
        logits = mnv3(normed)
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(lib.features("mnv3", x), seen["head"].double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lib.features("mnv3-b", x), seen["avgpool"].flatten(1).double().numpy(),
                               rtol=1e-5, atol=1e-6)
    for name in ("mnv3", "mnv3-b"):  # .pt and .safetensors: the same network
        p = lib.probabilities(name, x)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)  # a float32 softmax
        np.testing.assert_allclose(p, F.softmax(logits, dim=1).double().numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lib.logits(name, x), logits.double().numpy(), rtol=1e-5, atol=1e-6)
    # TorchScript: no hooks, yet its features are the input of its final Linear, and its logits its output.
    tiny = zoo["tiny"]
    t = (torch.from_numpy(x) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(lib.features("tiny", x), tiny[:-1](t).double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lib.probabilities("tiny", x), F.softmax(tiny(t), dim=1).double().numpy(),
                                   rtol=1e-5, atol=1e-7)
    # Batching changes nothing.
    np.testing.assert_allclose(lib.runner("mnv3").forward(x, batch_size=2)[0], lib.features("mnv3", x), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="images are 1x28x28 but classifier 'tiny' takes 3x32x32"):
        lib.features("tiny", images((1, 28, 28)))


def test_a_changed_weight_file_is_refused_in_one_line(library, tmp_path):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(library, copy)
    path = copy / Library.load(copy).classifiers["tiny"].weights
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(LibraryError, match=r"corrupted \(sha256 mismatch\).*simex library add") as e:
        Library.load(copy).features("tiny", images())
    assert "\n" not in str(e.value)


def test_what_cannot_be_added_is_a_one_line_error(zoo, tmp_path, simex_here, monkeypatch):
    d = zoo["dir"]

    def add(*args):
        proc = simex_here("library", "add", "--library", tmp_path / "lib", *args, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    mnv3 = ("--arch", "torchvision:mobilenet_v3_small", "--weights", d / "mnv3.pt", "--image-format", "3x32x32")
    assert "--num-classes 7 but the weights' classification head (classifier.3.weight) has 10 outputs; pass " \
           "--num-classes 10" in add(*mnv3, "--num-classes", 7)
    assert "--num-classes 3 but the archive's classification head" in add(
        "--arch", "torchscript", "--weights", d / "tiny.pt", "--num-classes", 3, "--image-format", "3x32x32")
    assert "do not fit torchvision:resnet18" in add("--arch", "torchvision:resnet18", "--weights", d / "mnv3.pt",
                                                    "--num-classes", 10)
    assert "cannot take 3x8x8 images" in add("--arch", "torchscript", "--weights", d / "tiny.pt", "--num-classes", 10,
                                             "--image-format", "3x8x8")
    assert "no module 'layer9'" in add(*mnv3, "--num-classes", 10, "--layer", "layer9")
    assert "need 3 value(s) each" in add(*mnv3, "--num-classes", 10, "--mean", "0.5", "--std", "0.5")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    assert "timm is not installed; pip install timm" in add("--arch", "timm:resnet18", "--weights", d / "mnv3.pt",
                                                            "--num-classes", 10)
    assert not (tmp_path / "lib").exists()  # nothing written by a refused add


def test_a_pickled_module_is_never_unpickled(zoo, tmp_path, simex_here):
    proc = simex_here("library", "add", "--library", tmp_path / "lib", "--arch", "torchvision:mobilenet_v3_small",
                      "--weights", zoo["dir"] / "pickled.pt", "--num-classes", 10, check=False)
    assert proc.returncode == 2 and "cannot be read as .pt" in proc.stderr and "weights_only" not in proc.stderr


def test_verify_takes_the_best_classifier_of_each_top_reference():
    records = {n: Classifier(n, spec, 0, 10, "") for n, spec in
               (("a@s0", "a"), ("a@s1", "a"), ("b@s0", "b"), ("zoo-x", "a"), ("c", "c"))}
    lib = Library(None, records)
    ranking = ["a@s1", "zoo-x", "a@s0", "c", "b@s0"]
    assert top_references(lib, ranking, 2) == ["a@s1", "c"]
    assert top_references(lib, ranking, 5) == ["a@s1", "c", "b@s0"]  # only three references


def test_select_ranks_a_mixed_zoo_and_verifies_distinct_references(library, simex_here):
    out = json.loads(simex_here("select", "--library", library, "--data", "digits", "--samples", 120, "--split",
                                "test", "--method", "knn,entropy", "--verify", 2, "--no-ray", "--json").stdout)
    names = {"mnv3", "mnv3-b", "tiny", "lenet"}
    assert set(out["scores"]["knn"]) == names and out["n"] == 20
    assert all(v is not None for s in out["scores"].values() for v in s.values())  # 3x32x32 and 1x28x28 alike
    assert out["classifiers"] == {"mnv3": "digits", "mnv3-b": "digits", "tiny": "tiny", "lenet": "rotated:digits"}
    v = out["verified"]
    refs = [out["classifiers"][n] for n in v["accuracy"]]
    assert len(v["accuracy"]) == 2 and len(set(refs)) == 2  # two references, never two of digits'
    assert list(v["accuracy"])[0] == out["ranking"]["knn"][0]
    assert all(0.0 <= a <= 1.0 for a in v["accuracy"].values())


def test_generic_transfer_learns_from_informative_features_only(zoo):
    """A fresh Linear on frozen features: a network whose features are the image average-pooled to 4x4 (a
    linear probe on them is logistic regression on coarse pixels) transfers to digits; one whose penultimate
    layer is all zeros gives constant features, so its probe can only predict one class."""
    import dataclasses
    import io

    from simex_ray.protocol import DEFAULT, load_splits
    from simex_ray.transfer.learning import transfer_head

    split = load_splits("digits", samples=300, data_seed=0,
                        protocol=dataclasses.replace(DEFAULT, image_format="3x32x32", test_samples=None))
    kw = split.clf_kwargs()
    dead = tiny_net()
    with torch.no_grad():
        dead[1].weight.zero_(), dead[1].bias.zero_()
    bases = {}
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))
    for name, net in (("pooled", pooled), ("dead", dead)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            buf = io.BytesIO()
            torch.jit.save(torch.jit.script(net), buf)
        bases[name] = {"architecture": "torchscript", "n_classes": 10, "image_format": "3x32x32",
                       "weights": buf.getvalue(), "suffix": ".pt"}
    good = transfer_head(bases["pooled"], **kw, configs=("TL-2",), max_epochs=30, patience=5)
    flat = transfer_head(bases["dead"], **kw, configs=("TL-1", "TL-2"), max_epochs=5, patience=2)
    share = np.bincount(kw["y_test"]).max() / len(kw["y_test"])
    assert share == pytest.approx(0.1)
    assert good["feature_dim"] == 48 and good["accuracy"] > 3 * share, good  # chance: 0.1 (balanced test split)
    assert [r["config"] for r in flat["configs"]] == ["TL-1", "TL-2"]
    assert flat["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in flat["configs"]]))
    assert all(r["accuracy"] <= share + 1e-9 for r in flat["configs"])


def test_simex_needs_the_reference_of_every_classifier(library):
    from simex_ray.transfer.selection import select

    lib = Library.load(library)
    deltas = {"digits": 0.25, "rotated:digits": 0.5}
    with pytest.raises(ValueError, match=r"classifier\(s\) tiny have no reference dataset.*--source SPEC"):
        select(lib, images(), None, methods=["simex"], deltas=deltas)
    scores = select(lib, images(), None, methods=["simex"], deltas=deltas,
                    classifiers=["mnv3", "mnv3-b", "lenet"]).scores["simex"]
    assert scores == {"mnv3": -0.25, "mnv3-b": -0.25, "lenet": -0.5}  # -Δ of each one's reference
