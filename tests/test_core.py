"""Known answers and invariances of the Ray-free core: models, delta, training, fleet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simex_ray import data
from simex_ray.fleet import Fleet, FleetError, mean_l2_norm, read_manifest
from simex_ray.errors import UnknownMemberError
from simex_ray.losses import per_sample_delta
from simex_ray.models import architectures, create_autoencoder
from simex_ray.fleet.plan import FleetWriter, plan_fleet
from simex_ray.training import TrainConfig, train_member


def _bars(n=8):
    """n distinct images: a horizontal and a vertical bar at positions that differ per image."""
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        x[i, 0, 4 + 2 * i:10 + 2 * i, 4:24] = 1.0
        x[i, 0, 4:24, 20 - 2 * i:23 - 2 * i] = 1.0
    return x


@pytest.mark.parametrize("name", architectures())
def test_every_architecture_learns_to_reconstruct_a_batch(name):
    torch.manual_seed(0)
    model = create_autoencoder(name)
    x = _bars()
    code = model.encode(x)
    assert code.shape == (8, model.code_size)
    assert torch.equal(model.decode(code), model(x))  # forward is decode after encode, nothing else
    before = per_sample_delta(x, model(x).detach(), "mse").mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        per_sample_delta(x, model(x), "mse").mean().backward()
        opt.step()
    y = model(x).detach()
    assert per_sample_delta(x, y, "mse").mean().item() < 0.2 * before  # training lowers delta
    # Each reconstruction is nearest to its own input: the code carries the image, not only its average.
    cross = ((y[:, None] - x[None]) ** 2).mean(dim=(2, 3, 4))
    assert torch.equal(cross.argmin(dim=1), torch.arange(8))


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: .*lenet"):
        create_autoencoder("resnet")


def test_lenet_encoder_is_lenet5():
    convs = [m for m in create_autoencoder("lenet").features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    fcs = [m for m in create_autoencoder("lenet").bottleneck if isinstance(m, torch.nn.Linear)]
    assert [f.out_features for f in fcs] == [120, 84]


@pytest.mark.parametrize("loss", ["mse", "issim"])
def test_delta_of_a_perfect_reconstruction_is_zero(loss):
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(per_sample_delta(x, x.clone(), loss), torch.zeros(4), atol=1e-6)


def test_mse_known_answer():
    x = torch.zeros(3, 1, 28, 28)
    assert torch.allclose(per_sample_delta(x, x + 0.5, "mse"), torch.full((3,), 0.25))


def test_issim_grows_with_distortion():
    x = torch.rand(1, 1, 28, 28)
    noisy = [per_sample_delta(x, (x + s * torch.randn_like(x)).clamp(0, 1), "issim").item() for s in (0.05, 0.2, 0.5)]
    assert noisy == sorted(noisy) and noisy[0] > 0


def test_delta_rejects_mismatched_shapes_and_unknown_losses():
    with pytest.raises(ValueError, match="shape"):
        per_sample_delta(torch.zeros(2, 1, 28, 28), torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError, match="known: mse, issim"):
        per_sample_delta(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28), "l1")


def test_train_config_validates_and_resolves_defaults():
    assert TrainConfig(optimizer="rmsprop").to_dict()["lr"] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="known: .*adam"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def _small_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.random((16, 1, 28, 28), dtype=np.float32)


def test_training_is_deterministic_and_resume_is_exact():
    x, xt = _small_data()
    cfg = TrainConfig(epochs=3, batch_size=16, seed=3)
    straight, hist = train_member(x, xt, cfg)
    again, _ = train_member(x, xt, cfg)
    states = {}
    train_member(x, xt, TrainConfig(epochs=1, batch_size=16, seed=3),
                 on_epoch=lambda e, m, s: states.update(s))
    resumed, hist2 = train_member(x, xt, cfg, resume=states)
    for a, b, c in zip(straight.state_dict().values(), again.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert [h["train_delta"] for h in hist] == [h["train_delta"] for h in hist2]


def test_training_lowers_delta():
    x, xt = _small_data(128)
    _, hist = train_member(x, xt, TrainConfig(epochs=3, batch_size=16))
    assert hist[-1]["train_delta"] < hist[0]["train_delta"]


def test_own_data_has_the_smallest_delta(tiny_fleet):
    fleet = Fleet.load(tiny_fleet)
    for spec in ("digits", "bgrand:digits"):
        _, test = data.prepare(spec, samples=300, seed=0)
        assert fleet.score(test.x).ranking[0] == spec


def test_delta_does_not_depend_on_batch_size_or_order(tiny_fleet):
    fleet = Fleet.load(tiny_fleet)
    x = data.load("digits").x[:200]
    base = fleet.score(x).delta
    fleet.engine.chunk = 7
    shuffled = fleet.score(x[np.random.default_rng(0).permutation(len(x))]).delta
    for name in base:
        assert shuffled[name] == pytest.approx(base[name], rel=1e-5)


def test_normalized_delta_divides_by_the_reference_mean_l2_norm(tiny_fleet):
    fleet = Fleet.load(tiny_fleet)
    result = fleet.score(data.load("digits").x[:50])
    train, _ = data.prepare("digits", samples=300, seed=0)
    assert fleet.members["digits"].metrics["ref_mean_l2"] == pytest.approx(mean_l2_norm(train.x))
    assert result.delta_normalized["digits"] == pytest.approx(result.delta["digits"] / mean_l2_norm(train.x))
    assert result.ranking_raw == sorted(result.delta, key=result.delta.get)


def test_save_load_round_trip_is_exact(tiny_fleet, tmp_path):
    fleet = Fleet.load(tiny_fleet)
    plan = plan_fleet(["digits"], TrainConfig(epochs=2), samples=300, seed=0)[0]
    writer = FleetWriter(tmp_path)
    writer.add(plan, fleet.models["digits"].state_dict(), fleet.members["digits"].history)
    again = Fleet.load(tmp_path)
    x = torch.as_tensor(data.load("digits").x[:64])
    with torch.no_grad():
        assert torch.equal(fleet.models["digits"](x), again.models["digits"](x))
    manifest = read_manifest(tmp_path)
    (m,) = manifest["members"]
    assert m["name"] == "digits" and m["config"]["loss"] == "mse" and len(m["sha256"]) == 64
    assert m["fingerprint"] == plan.member.fingerprint and "test_delta" in m["metrics"]


def test_manifest_records_what_the_issue_names(tiny_fleet):
    manifest = json.loads((tiny_fleet / "manifest.json").read_text())
    assert manifest["loss"] == "mse"
    for m in manifest["members"]:
        assert {"name", "spec", "class", "config", "fingerprint", "metrics", "sha256", "weights"} <= set(m)
        assert {"architecture", "loss", "epochs", "optimizer", "lr", "seed", "batch_size"} <= set(m["config"])
        assert {"train_delta", "test_delta", "ref_mean_l2"} <= set(m["metrics"])


def _copy_fleet(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_weight_file_is_named(tiny_fleet, tmp_path):
    fleet_dir = _copy_fleet(tiny_fleet, tmp_path / "f")
    weights = next((fleet_dir / "weights").glob("digits-*.pt"))
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(FleetError, match=f"{weights.name}.*corrupted") as e:
        Fleet.load(fleet_dir)
    assert "\n" not in str(e.value)


def test_missing_weight_file_and_bad_manifest_are_clear(tiny_fleet, tmp_path):
    fleet_dir = _copy_fleet(tiny_fleet, tmp_path / "f")
    next((fleet_dir / "weights").glob("bgrand*.pt")).unlink()
    with pytest.raises(FleetError, match="missing"):
        Fleet.load(fleet_dir)
    (fleet_dir / "manifest.json").write_text("{not json")
    with pytest.raises(FleetError, match="manifest.json is corrupted"):
        Fleet.load(fleet_dir)
    with pytest.raises(FleetError, match="does not exist"):
        Fleet.load(tmp_path / "nope")


def test_score_errors(tiny_fleet):
    fleet = Fleet.load(tiny_fleet)
    with pytest.raises(ValueError, match="empty"):
        fleet.score(np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(KeyError, match="fleet has"):
        fleet.score(np.zeros((1, 1, 28, 28), np.float32), members=["mnist"])
    with pytest.raises(UnknownMemberError, match="unknown member"):
        Fleet.load(tiny_fleet, names=["mnist"])


def test_per_class_plan_names_members_by_class():
    plans = plan_fleet(["digits"], TrainConfig(epochs=1), samples=60, per_class=True)
    assert [p.name for p in plans] == [f"digits#{c}" for c in range(10)]
    assert {p.member.class_ for p in plans} == {str(c) for c in range(10)}
    assert all(len(p.x_train) == 50 and len(p.x_test) == 10 for p in plans)


def test_plan_rejects_duplicates_and_keys_runs_without_epochs():
    with pytest.raises(data.SpecError, match="twice"):
        plan_fleet(["digits", "digits"], TrainConfig())
    a = plan_fleet(["digits"], TrainConfig(epochs=1), samples=60)[0]
    b = plan_fleet(["digits"], TrainConfig(epochs=5), samples=60)[0]
    c = plan_fleet(["digits"], TrainConfig(epochs=5, lr=0.1), samples=60)[0]
    assert a.run_key == b.run_key != c.run_key


def test_finished_members_are_not_retrained(tiny_fleet, tmp_path):
    fleet_dir = _copy_fleet(tiny_fleet, tmp_path / "f")
    plans = plan_fleet(["digits", "bgrand:digits", "rotated:digits"], TrainConfig(epochs=2), samples=300)
    assert [p.name for p in FleetWriter(fleet_dir).pending(plans)] == ["rotated:digits"]
    plans = plan_fleet(["digits"], TrainConfig(epochs=3), samples=300)
    assert [p.name for p in FleetWriter(fleet_dir).pending(plans)] == ["digits"]


def test_in_process_training_resumes_from_its_epoch_checkpoints(tmp_path):
    """--no-ray keeps a checkpoint per epoch: more epochs later continue, exactly as one long run."""
    from simex_ray.fleet.build import train_fleet_local

    def plans(epochs):
        return plan_fleet(["digits"], TrainConfig(epochs=epochs), samples=120, seed=0)

    seen = []
    train_fleet_local(plans(1), tmp_path / "F", on_epoch=lambda n, m: seen.append(m["epoch"]))
    train_fleet_local(plans(2), tmp_path / "F", on_epoch=lambda n, m: seen.append(m["epoch"]))
    assert seen == [1, 2]  # the second run trained only epoch 2
    train_fleet_local(plans(2), tmp_path / "G")
    a, b = Fleet.load(tmp_path / "F"), Fleet.load(tmp_path / "G")
    assert [h["epoch"] for h in a.members["digits"].history] == [1, 2]
    for k, v in a.models["digits"].state_dict().items():
        assert torch.equal(v, b.models["digits"].state_dict()[k]), k
