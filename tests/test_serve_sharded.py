"""The sharded Serve layout: the fleet in S shard applications, asked at once and merged by the ingress.

The layout, naming and merge rules are checked without Ray; one module of real Serve over HTTP checks
that S=2 shards answer exactly like the fused layout and like `Fleet.score` in process, that an update
redeploys only the changed shard, and that a lost shard replica never yields a partial answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import requests

from simex_ray import data
from simex_ray.api import ApiError
from simex_ray.distributed.serving.deploy import ServeSettings
from simex_ray.distributed.serving.layouts import Sharded, shard_app_name
from simex_ray.distributed.serving.sharded import gather_shards, shard_layout
from simex_ray.fleet import SCORE_FIELDS, Fleet, read_manifest

fleet_shards = Sharded.shards

REFS = ["digits", "rotated:digits", "bgrand:digits", "bgimage:digits"]


# ------------------------------------------------------------------ without Ray


def test_shard_layout_is_contiguous_in_fleet_order():
    names = [f"m{i}" for i in range(7)]
    assert shard_layout(names, shards=2) == [names[:4], names[4:]]
    assert shard_layout(names, shards=3) == [names[:3], names[3:5], names[5:]]
    assert shard_layout(names, shards=20) == [[n] for n in names]  # at most one shard per member
    assert shard_layout(names, members_per_shard=3) == [names[:3], names[3:6], names[6:]]
    assert shard_layout(names) == [names]  # default 16 per shard
    for layout in (shard_layout(names, shards=s) for s in range(1, 9)):
        assert sum(layout, []) == names and all(layout)
    with pytest.raises(ValueError, match="not both"):
        shard_layout(names, shards=2, members_per_shard=2)
    with pytest.raises(ValueError, match=">= 1"):
        ServeSettings(mode="sharded", shards=0)
    with pytest.raises(ValueError, match="--mode sharded"):
        ServeSettings(mode="fused", shards=2)


def records(n: int, changed: dict[int, str] | None = None) -> list[dict]:
    return [{"name": f"m{i}", "sha256": (changed or {}).get(i, f"{i:02d}" * 32)} for i in range(n)]


def test_a_changed_member_renames_only_its_shard():
    s = ServeSettings(mode="sharded", members_per_shard=2)
    before = [shard_app_name(shard) for shard in fleet_shards(records(5), s)]
    assert len(before) == len(set(before)) == 3 and all(a.startswith("simex-shard-") for a in before)
    after = [shard_app_name(shard) for shard in fleet_shards(records(5, {3: "ff" * 32}), s)]
    assert [a == b for a, b in zip(before, after)] == [True, False, True]
    grown = [shard_app_name(shard) for shard in fleet_shards(records(6), s)]  # m5 appended: joins the last shard
    assert grown[:2] == before[:2] and grown[2] != before[2]


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_gather_merges_every_needed_shard_or_fails_whole():
    shards = [("h0", ["a", "b"]), ("h1", ["c"]), ("h2", ["d", "e"])]
    n = 3
    asked, cancelled = [], []

    async def call(handle, what):
        asked.append(handle)
        k = {"h0": 0, "h1": 2, "h2": 3}[handle]
        rows = len(dict(shards)[handle])
        return np.arange(k * n, (k + rows) * n, dtype=float).reshape(rows, n)  # row r of member #k+r

    d = run(gather_shards(shards, ["e", "a", "c"], n, call))
    np.testing.assert_array_equal(d, [[12, 13, 14], [0, 1, 2], [6, 7, 8]])  # rows in the requested order
    assert sorted(asked) == ["h0", "h1", "h2"]
    asked.clear()
    run(gather_shards(shards, ["b"], n, call))
    assert asked == ["h0"]  # only the shards holding a requested member are asked

    async def one_lost(handle, what):
        if handle == "h1":
            await asyncio.sleep(0.01)
            raise ApiError(503, f"{what} is unavailable (ActorDiedError); retry shortly")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(handle)
            raise
        return await call(handle, what)

    with pytest.raises(ApiError) as e:
        run(gather_shards(shards, ["a", "c", "d"], n, one_lost))
    assert e.value.status == 503 and "shard 2/3" in e.value.message
    assert sorted(cancelled) == ["h0", "h2"]  # the other shards' calls do not run on

    async def short(handle, what):  # a shard answering for fewer members than it holds
        return (await call(handle, what))[:1]

    with pytest.raises(ApiError) as e:
        run(gather_shards(shards, ["a", "d"], n, short))
    assert e.value.status == 503


def fake_fleet(tmp_path, n: int):
    """A manifest of n members (names, weight hashes, no weights): all `simex serve config` reads."""
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": 1, "members": [{"name": f"m{i}", "spec": f"m{i}", "fingerprint": "0", "config": {},
                                   "sha256": f"{i:02d}" * 32} for i in range(n)]}))
    return tmp_path


def test_serve_config_sharded_and_the_members_mode_warning(tmp_path, capsys, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    import simex_ray.distributed.serving.deploy as deploy_module
    from simex_ray.cli import main

    fleet = fake_fleet(tmp_path, 5)
    capsys.readouterr()
    assert main(["serve", "config", "--fleet", str(fleet), "--mode", "sharded", "--shards", "2",
                 "--autoscale", "1:3", "--cpus-per-replica", "0.5"]) == 0
    out, err = capsys.readouterr()
    config = yaml.safe_load(out)
    ServeDeploySchema.model_validate(config)
    ingress, *shards = config["applications"]
    assert [s["args"]["names"] for s in shards] == [["m0", "m1", "m2"], ["m3", "m4"]]
    assert all(s["name"].startswith("simex-shard-") and s["import_path"].endswith("app:fleet_app") for s in shards)
    assert all(s["args"]["autoscaling_config"]["max_replicas"] == 3 for s in shards)  # each shard scales alone
    assert ingress["args"]["shards"] == [{"app": s["name"], "members": s["args"]["names"]} for s in shards]
    assert "warning" not in err

    assert main(["serve", "config", "--fleet", str(fleet), "--shards", "2"]) == 2  # without --mode sharded
    assert "add --mode sharded" in capsys.readouterr().err
    monkeypatch.setattr(deploy_module, "MEMBERS_MODE_LIMIT", 4)
    assert main(["serve", "config", "--fleet", str(fleet), "--mode", "members"]) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--mode sharded" in err and "5 members" in err
    assert main(["serve", "config", "--fleet", str(fake_fleet(tmp_path, 4)), "--mode", "members"]) == 0
    assert capsys.readouterr().err == ""  # at the limit: no warning


# ------------------------------------------------------------------ on Ray Serve


@pytest.fixture(scope="module")
def four_fleet(tmp_path_factory):
    """Four members, one epoch on 120 samples each, trained in this process (about 15 s)."""
    from simex_ray.fleet.build import train_fleet_local
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    out = tmp_path_factory.mktemp("sharded") / "fleet"
    train_fleet_local(plan_fleet(REFS, TrainConfig(epochs=1), samples=120, seed=0), out,
                      extra={"refs": REFS, "samples": 120, "seed": 0})
    return out


@pytest.fixture(scope="module")
def service(ray_cluster, four_fleet):
    from dataclasses import replace

    from ray import serve

    from simex_ray.distributed.serving.deploy import deploy, undeploy
    from tests.conftest import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(mode="sharded", shards=2, cpus_per_replica=0.1)

    class Service:
        url = f"http://127.0.0.1:{port}"
        fleet = four_fleet

        def redeploy(self, **changes):
            return deploy(four_fleet, replace(settings, **changes))

    try:
        yield Service()
    finally:
        undeploy()
        serve.shutdown()


def unknown_images() -> np.ndarray:
    """Held-out images of two references (a mixture: the composition is not trivial), (40, 1, 28, 28)."""
    return np.concatenate([data.prepare(spec, samples=120, seed=0)[1].x[:30]
                           for spec in ("digits", "bgimage:digits")])


def score_http(service, x, **params) -> requests.Response:
    from tests.test_serve import post_npy

    return post_npy(service, x, params={"per_sample": "true", **params})


def assert_same(got: dict, expected: dict, tolerance: float = 1e-6) -> None:
    """Every field of the score contract, and the per-sample δ, agree (numbers to ``tolerance``)."""
    from tests.test_serve import assert_same_score

    assert_same_score(got, expected, tolerance)
    if "per_sample" in expected:
        assert got["per_sample"]["nearest"] == expected["per_sample"]["nearest"]
        for name, row in expected["per_sample"]["delta"].items():
            np.testing.assert_allclose(got["per_sample"]["delta"][name], row, rtol=tolerance, atol=tolerance)


def in_process(fleet, x, members=None, method=None) -> dict:
    r = Fleet.load(fleet).score(x, members=members, method=method, per_sample=True)
    return {**r.to_json(), "per_sample": {"delta": dict(zip(r.delta, r.per_sample.tolist())),
                                          "nearest": r.nearest}}


def shard_apps() -> list[str]:
    from ray import serve

    return sorted(a for a in serve.status().applications if a.startswith("simex-shard-"))


def replicas_of(app: str) -> list[tuple[str, str]]:
    """(name, namespace) of each live Serve replica actor of application ``app``."""
    import ray

    return sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#"))


@pytest.mark.ray
def test_two_shards_answer_like_fused_and_in_process(service):
    x = unknown_images()
    service.redeploy(mode="fused", shards=None)
    fused = score_http(service, x)
    assert fused.status_code == 200, fused.text
    assert not shard_apps()

    changes = service.redeploy()  # back to the sharded layout: S=2
    apps = shard_apps()
    assert len(apps) == 2 and sorted(changes["added"]) == apps and changes["removed"][0].startswith("simex-fleet-")
    members = requests.get(service.url + "/v1/members", timeout=30).json()
    assert [m["name"] for m in members["members"]] == REFS and members["image_format"] == "1x28x28"
    layout = members["layout"]
    assert layout["mode"] == "sharded" and [s["members"] for s in layout["shards"]] == [REFS[:2], REFS[2:]]
    assert sorted(s["app"] for s in layout["shards"]) == apps

    sharded = score_http(service, x)
    assert sharded.status_code == 200, sharded.text
    assert set(SCORE_FIELDS) <= set(sharded.json())
    assert sharded.json()["ranking_method"] == "typicality_latent"  # z from every shard, merged in fleet order
    assert_same(sharded.json(), fused.json())
    assert_same(sharded.json(), in_process(service.fleet, x))
    assert len(set(sharded.json()["per_sample"]["nearest"])) > 1  # a real mixture: rows from both shards
    for ranking in ("calibrated", "in_distribution"):
        assert_same(score_http(service, x, ranking=ranking).json(), in_process(service.fleet, x, method=ranking))

    # A subset of members, across the shards and in the order asked; and one shard alone.
    from tests.test_serve import post_json

    for subset in (["bgimage:digits", "digits"], ["rotated:digits"]):
        r = post_json(service, {"images": x[:, 0].tolist(), "members": subset}, params={"per_sample": "true"})
        assert r.status_code == 200, r.text
        assert list(r.json()["delta"]) == subset
        assert_same(r.json(), in_process(service.fleet, x, subset))


def _hammer(service, x, stop: threading.Event, answers: list):
    from tests.test_serve import post_npy

    while not stop.is_set():
        try:
            r = post_npy(service, x)
            answers.append((r.status_code, r.json(), r.headers.get("retry-after"), r.elapsed.total_seconds()))
        except requests.RequestException as e:
            answers.append((type(e).__name__, None, None, None))


@pytest.mark.ray
def test_update_redeploys_only_the_changed_shard_and_a_lost_replica_is_never_partial(service):
    import ray
    from ray import serve

    from simex_ray.fleet.build import train_fleet_local
    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    service.redeploy()
    x = unknown_images()[::3]  # 20 images: many requests while things change
    old = {s["members"][0]: s["app"] for s in requests.get(service.url + "/v1/members", timeout=30).json()
           ["layout"]["shards"]}
    first, second = old["digits"], old["bgrand:digits"]
    status = serve.status().applications
    deployed, replicas = status[first].last_deployed_time_s, replicas_of(first)
    pid = serve.get_app_handle(first).pid.remote().result(timeout_s=60)
    assert len(replicas) == 1
    before = in_process(service.fleet, x)

    # bgimage:digits retrained (another model seed): only the second shard's application changes.
    stop, answers = threading.Event(), []
    t = threading.Thread(target=_hammer, args=(service, x, stop, answers))
    t.start()
    try:
        train_fleet_local(plan_fleet(["bgimage:digits"], TrainConfig(epochs=1, seed=7), samples=120, seed=0),
                          service.fleet)
        changes = service.redeploy()
    finally:
        stop.set()
        t.join()
    assert changes["kept"] == [first] and changes["removed"] == [second] and len(changes["added"]) == 1
    assert [m["name"] for m in read_manifest(service.fleet)["members"]] == REFS  # replaced in place
    assert serve.status().applications[first].last_deployed_time_s == deployed
    assert replicas_of(first) == replicas and serve.get_app_handle(first).pid.remote().result(timeout_s=60) == pid
    assert answers and all(code == 200 and list(body["delta"]) == REFS for code, body, *_ in answers), \
        [a[0] for a in answers]  # every request during the update answered, by every member
    new = in_process(service.fleet, x)
    after = score_http(service, x)
    assert after.status_code == 200, after.text
    assert new["delta"]["bgimage:digits"] != before["delta"]["bgimage:digits"]  # a new model answers
    assert_same(after.json(), new)

    # A shard replica is killed under requests: each answer is the full, right one, or a 503 with Retry-After.
    expected = Fleet.load(service.fleet).score(x).delta
    victim = replicas_of(changes["added"][0])
    assert len(victim) == 1
    stop, answers = threading.Event(), []
    t = threading.Thread(target=_hammer, args=(service, x, stop, answers))
    t.start()
    try:
        time.sleep(1)
        ray.kill(ray.get_actor(*victim[0]), no_restart=True)
        time.sleep(8)
    finally:
        stop.set()
        t.join()
    codes = [code for code, *_ in answers]
    assert codes and set(codes) <= {200, 503}, codes
    for code, body, retry_after, _ in answers:
        if code == 200:
            assert list(body["delta"]) == REFS  # never a subset of the members
            assert body["delta"] == pytest.approx(expected, rel=1e-6)
        else:
            assert body["status"] == 503 and "shard 2/2" in body["error"] and retry_after == "1"
    # Serve replaces the replica and the service answers in full again.
    deadline = time.time() + 120
    while not (len(replicas_of(changes["added"][0])) == 1 and victim[0] not in replicas_of(changes["added"][0])
               and score_http(service, x).status_code == 200):
        assert time.time() < deadline, replicas_of(changes["added"][0])
        time.sleep(0.2)
    assert score_http(service, x).json()["delta"] == pytest.approx(expected, rel=1e-6)

    print(f"lost shard replica: {codes.count(200)} answers of 200, {codes.count(503)} of 503, slowest "
          f"{max(a[3] for a in answers):.1f}s")

    # A shard gone for good (its application deleted under the ingress): a 503 that names it, never the
    # other shard's members alone; the next update deploys it again.
    serve.delete(changes["added"][0])
    gone = requests.post(service.url + "/v1/score", json={"images": x[:, 0].tolist()}, timeout=60)
    assert gone.status_code == 503 and gone.headers["retry-after"] == "1", gone.text
    assert set(gone.json()) == {"error", "status"} and "shard 2/2" in gone.json()["error"]
    assert service.redeploy()["added"] == changes["added"]
    assert score_http(service, x).json()["delta"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.ray
def test_an_update_with_no_room_is_removed_again_and_the_service_keeps_answering(service, caplog, monkeypatch):
    """New scorers that cannot be placed (here: more CPUs per replica than the cluster has) would keep
    Serve's own deploy waiting forever; ours gives up after --deploy-timeout, removes them, and the
    running layout answers as before."""
    from types import SimpleNamespace

    from simex_ray.distributed.serving import deploy as deploy_module
    from simex_ray.distributed.serving.deploy import DeployError

    service.redeploy()
    before = shard_apps()
    x = unknown_images()
    expected = score_http(service, x).json()
    # Every clock reading of the wait: it gives up at its first check past the deadline, not later, and
    # never before it (a fact of the loop, whatever the machine's load makes each poll cost).
    readings = []

    def monotonic():
        readings.append(time.monotonic())
        return readings[-1]

    monkeypatch.setattr(deploy_module, "time", SimpleNamespace(monotonic=monotonic, sleep=time.sleep))
    with caplog.at_level("WARNING", logger="simex_ray.distributed.serving.deploy"), \
            pytest.raises(DeployError, match="not running after 5 s; removed again") as e:
        service.redeploy(mode="fused", shards=None, cpus_per_replica=16.0, deploy_timeout_s=5)
    monkeypatch.undo()
    deadline = readings[0] + 5
    assert len(readings) >= 3 and readings[-1] > deadline and all(r <= deadline for r in readings[1:-1])
    assert "simex-fleet-" in str(e.value)
    assert any("need 16.00 CPUs" in r.getMessage() for r in caplog.records)  # said at once, not after the wait
    from ray import serve

    assert not [a for a in serve.status().applications if a.startswith("simex-fleet-")]
    assert shard_apps() == before
    again = score_http(service, x)
    assert again.status_code == 200, again.text
    assert_same(again.json(), expected)


def test_every_layout_is_one_registry_object_and_the_cli_offers_exactly_them(tmp_path):
    from simex_ray.choices import SERVE_MODES
    from simex_ray.distributed.serving.deploy import _ingress_args, _scorers
    from simex_ray.distributed.serving.layouts import LAYOUTS, mode_of

    assert list(LAYOUTS) == list(SERVE_MODES)  # --mode's choices and help name the registry's layouts, in order
    members = records(5)
    for name, layout in LAYOUTS.items():
        s = ServeSettings(mode=name, **({"members_per_shard": 2} if name == "sharded" else {}))
        scorers = _scorers(str(tmp_path), members, s)
        # Each layout's applications hold every member exactly once (embedded: the ingress holds them).
        held = [m for a in scorers for m in ([a.args["member"]] if "member" in a.args else
                                              a.args.get("names", [r["name"] for r in a.records.get("records", [])]))]
        assert sorted(held) == ([] if name == "embedded" else sorted(m["name"] for m in members))
        assert len({a.name for a in scorers}) == len(scorers)
        args = _ingress_args(str(tmp_path), members, s)
        assert mode_of(args) == name == args["mode"]
        # A config written before `mode` existed names its layout by its keys.
        assert mode_of({k: v for k, v in args.items() if k != "mode"}) == name
