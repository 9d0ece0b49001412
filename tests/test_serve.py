"""The scoring service on a real local Ray Serve, through real HTTP requests."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import requests
import torch

from simex_ray import data
from simex_ray.api import Limits
from simex_ray.client import encode_files
from simex_ray.fleet import SCORE_FIELDS, Fleet, read_manifest, write_manifest, Member

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_fleet, tmp_path_factory):
    from ray import serve

    from simex_ray.distributed.serving.deploy import ServeSettings, deploy, undeploy
    from tests.conftest import free_port

    fleet = shutil.copytree(tiny_fleet, tmp_path_factory.mktemp("served") / "fleet")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(replicas=2, cpus_per_replica=0.1, limits=Limits(max_images=512, max_body_bytes=4 << 20))
    deploy(fleet, settings)

    class Service:
        url = f"http://127.0.0.1:{port}"

        def redeploy(self, manifest=None, **changes):
            from dataclasses import replace

            return deploy(fleet, replace(settings, **changes), manifest=manifest)

    Service.fleet = fleet
    yield Service()
    undeploy()
    serve.shutdown()


def post_json(service, payload, **kw):
    return requests.post(service.url + "/v1/score", json=payload, timeout=60, **kw)


def post_npy(service, array, **kw):
    buf = io.BytesIO()
    np.save(buf, array)
    return requests.post(service.url + "/v1/score", data=buf.getvalue(), timeout=60,
                         headers={"content-type": "application/x-npy", **kw.pop("headers", {})}, **kw)


def post_files(service, files, **kw):
    body, kind = encode_files(files)
    return requests.post(service.url + "/v1/score", data=body, headers={"content-type": kind}, timeout=60, **kw)


def assert_same_answer(after: dict, before: dict) -> None:
    """Two /v1/score answers for the same images agree (another layout, the same fleet), the default ranking
    (typicality_latent: the layout's scorers hand on z as well as δ) included."""
    assert after["ranking_method"] == before["ranking_method"] == "typicality_latent"
    for field in ("delta", "delta_calibrated", "in_distribution", "latent_calibrated", "typicality_latent"):
        for name, d in before[field].items():
            assert after[field][name] == pytest.approx(d, rel=1e-5, abs=1e-6), field  # abs: own data, typicality 0
    assert after["ranking"] == before["ranking"]


def assert_same_score(got: dict, expected: dict, tolerance: float = 1e-6) -> None:
    """Two answers for the same images agree on every field of the score contract (SCORE_FIELDS):
    numbers to ``tolerance``, rankings and everything else exactly. Fails when either lacks a field."""
    for answer in (got, expected):
        assert set(SCORE_FIELDS) <= set(answer), f"fields missing: {sorted(set(SCORE_FIELDS) - set(answer))}"
    for field in SCORE_FIELDS:
        want, have = expected[field], got[field]
        if isinstance(want, dict):
            assert set(have) == set(want), field
            for name, v in want.items():
                if v is None:
                    assert have[name] is None, (field, name)
                else:
                    assert have[name] == pytest.approx(v, rel=tolerance, abs=tolerance), (field, name)
        elif isinstance(want, float) and not isinstance(want, bool):
            assert have == pytest.approx(want, rel=tolerance, abs=tolerance), field
        else:
            assert have == want, field


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def held_out():
    return data.prepare("digits", samples=300, seed=0)[1].x  # (50, 1, 28, 28), unseen in training


def test_health_members_and_docs(service):
    assert requests.get(service.url + "/healthz", timeout=30).json()["status"] == "ok"
    members = requests.get(service.url + "/v1/members", timeout=30).json()
    assert [m["name"] for m in members["members"]] == ["digits", "bgrand:digits"]
    assert members["members"][0]["architecture"] == "lenet" and members["loss"] == "mse"
    assert members["image_format"] == "1x28x28" and members["members"][0]["image_format"] == "1x28x28"
    spec = requests.get(service.url + "/openapi.json", timeout=30).json()
    body = json.dumps(spec["paths"]["/v1/score"])
    assert "application/x-npy" in body and "multipart/form-data" in body
    assert "(N,1,28,28), (N,28,28,1) or (N,28,28)" in body and spec["info"]["x-image-format"] == "1x28x28"
    assert requests.get(service.url + "/docs", timeout=30).status_code == 200


def test_http_scores_equal_simex_score(service):
    x = held_out()
    cli = subprocess.run([sys.executable, "-m", "simex_ray.cli", "score", "--fleet", str(service.fleet),
                          "--data", "digits", "--split", "test", "--samples", "300", "--json"],
                         capture_output=True, text=True, timeout=300)
    expected = json.loads(cli.stdout)
    u8 = np.round(x * 255).astype(np.uint8)
    # uint8 images are other images (rounded): what they must equal is the same uint8 images scored here, as the
    # server converts them (an image near a threshold of the shares or of the composition grid may cross it)
    rounded = Fleet.load(service.fleet).score(u8.astype(np.float32) / np.float32(255.0)).to_json()
    cases = [(post_json(service, {"images": x[:, 0].tolist()}), expected),  # floats, (N,28,28)
             (post_npy(service, x), expected),  # (N,1,28,28) float32
             (post_npy(service, x.transpose(0, 2, 3, 1)), expected),  # (N,28,28,1)
             (post_npy(service, u8[:, 0]), rounded),  # uint8
             # the same uint8 images as PNG files: already 1x28x28, so decoded and not converted
             (post_files(service, [(f"{i}.png", png(img)) for i, img in enumerate(u8[:, 0])]), rounded)]
    for r, want in cases:
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["n"] == 50 and out["loss"] == "mse" and out["latency_ms"] > 0
        assert out["ranking"] == want["ranking"] == ["digits", "bgrand:digits"]
        assert_same_score(out, want)  # every field of the contract, typicality and composition included
        assert "per_sample" not in out
    assert cases[-1][0].json()["delta"] == cases[-2][0].json()["delta"]  # PNG files = the uint8 array, exactly
    only = post_json(service, {"images": x[:, 0].tolist(), "members": ["digits"]}).json()
    assert list(only["delta"]) == ["digits"]


def test_per_sample_answers_over_http_match_the_cli_table(service, tmp_path):
    import pandas as pd

    x = held_out()
    table = tmp_path / "per_sample.parquet"
    subprocess.run([sys.executable, "-m", "simex_ray.cli", "score", "--fleet", str(service.fleet), "--data", "digits",
                    "--split", "test", "--samples", "300", "--per-sample", str(table)], check=True, timeout=300,
                   capture_output=True)
    rows = pd.read_parquet(table)
    r = post_npy(service, x, params={"per_sample": "true", "ranking": "raw"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ranking_method"] == "raw" and len(out["per_sample"]["nearest"]) == 50
    np.testing.assert_allclose(out["per_sample"]["delta"]["digits"], rows["delta/digits"], rtol=1e-5)
    assert list(rows["index"]) == list(range(50)) and "label" in rows
    assert post_npy(service, x, params={"ranking": "best"}).status_code == 422
    assert post_npy(service, x, params={"per_sample": "maybe"}).status_code == 422


def _nan_body():
    x = held_out()[:2].astype(np.float64)
    x[0, 0, 0, 0] = np.nan
    return x


BAD = [
    ("wrong shape", lambda s: post_json(s, {"images": np.zeros((2, 32, 32)).tolist()}), 422, "shape"),
    ("flat vectors", lambda s: post_npy(s, np.zeros((2, 784), np.float32)), 422, "shape"),
    ("strings", lambda s: post_json(s, {"images": [[["a"] * 28] * 28]}), 422, "numbers"),
    ("NaN", lambda s: post_npy(s, _nan_body()), 422, "NaN"),
    ("inf in JSON", lambda s: requests.post(s.url + "/v1/score", data='{"images": [[[Infinity]]]}',
                                            headers={"content-type": "application/json"}, timeout=30), 422, ""),
    ("float out of range", lambda s: post_json(s, {"images": (np.ones((1, 28, 28)) * 1.5).tolist()}), 422, "[0,1]"),
    ("int out of range", lambda s: post_json(s, {"images": (np.ones((1, 28, 28), int) * 300).tolist()}), 422, "0..255"),
    ("empty batch", lambda s: post_json(s, {"images": []}), 422, "empty"),
    ("too many images", lambda s: post_npy(s, np.zeros((513, 28, 28), np.uint8)), 413, "limit"),
    ("body too large", lambda s: post_npy(s, np.zeros((700, 28, 28), np.float64)), 413, "limit"),
    ("unknown member", lambda s: post_json(s, {"images": np.zeros((1, 28, 28)).tolist(), "members": ["mnst"]}),
     404, "fleet has: "),
    ("members not a list", lambda s: post_json(s, {"images": np.zeros((1, 28, 28)).tolist(), "members": "x"}),
     422, "members"),
    ("no images field", lambda s: post_json(s, {"pictures": []}), 422, "images"),
    ("ragged images", lambda s: post_json(s, {"images": [[[0.0] * 28] * 28, [[0.0] * 27] * 28]}), 422, ""),
    ("malformed JSON", lambda s: requests.post(s.url + "/v1/score", data=b"{images:", timeout=30,
                                               headers={"content-type": "application/json"}), 400, "malformed"),
    ("malformed npy", lambda s: requests.post(s.url + "/v1/score", data=b"\x93NUMPYxx", timeout=30,
                                              headers={"content-type": "application/x-npy"}), 400, "npy"),
    ("wrong content type", lambda s: requests.post(s.url + "/v1/score", data=b"1,2,3", timeout=30,
                                                   headers={"content-type": "text/csv"}), 415, "content type"),
    ("pickled npy", lambda s: post_npy(s, np.array([{"a": 1}], dtype=object)), 400, "npy"),
    ("undecodable file", lambda s: post_files(s, [("a.txt", b"text")]), 422, "decode"),
    ("file not in the format, strict", lambda s: post_files(s, [("a.png", png(np.zeros((32, 32), np.uint8)))],
                                                            params={"strict_format": "true"}), 422, "1x28x28"),
]


@pytest.mark.parametrize("name, send, status, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_json_error(service, name, send, status, needle):
    r = send(service)
    assert r.status_code == status, r.text
    body = r.json()
    assert needle in body["error"] and "\n" not in body["error"]
    if needle == "shape":  # the expected shapes of the fleet's format are named
        assert "(N,1,28,28), (N,28,28,1) or (N,28,28)" in body["error"]


def test_service_still_healthy_after_bad_input(service):
    assert post_npy(service, held_out()).status_code == 200


def test_api_key(service):
    service.redeploy(api_key="s3cret")
    try:
        x = held_out()[:3]
        assert post_npy(service, x).status_code == 401
        assert post_npy(service, x, headers={"x-api-key": "wrong"}).status_code == 401
        assert post_npy(service, x, headers={"x-api-key": "s3cret"}).status_code == 200
        assert requests.get(service.url + "/v1/members", timeout=30).status_code == 401
    finally:
        service.redeploy()
    assert post_npy(service, held_out()[:3]).status_code == 200


def _hammer(service, stop: threading.Event, codes: list):
    x = held_out()[:8]
    while not stop.is_set():
        try:
            codes.append(post_npy(service, x).status_code)
        except requests.RequestException as e:
            codes.append(type(e).__name__)


def test_concurrent_requests_agree(service):
    x = held_out()
    expected = Fleet.load(service.fleet).score(x).delta
    results = []

    def client():
        for _ in range(3):
            results.append(post_npy(service, x))

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 36 and all(r.status_code == 200 for r in results)
    for r in results:
        for name, d in expected.items():
            assert r.json()["delta"][name] == pytest.approx(d, rel=1e-5)


def test_replica_kill_keeps_the_service_answering(service):
    import ray
    from ray import serve

    app = read_manifest(service.fleet)["members"][0]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"] and "simex-m-digits" in a["name"]]
    assert len(replicas) == 2, replicas
    stop, codes = threading.Event(), []
    t = threading.Thread(target=_hammer, args=(service, stop, codes))
    t.start()
    time.sleep(1)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    time.sleep(8)
    stop.set()
    t.join()
    assert codes and all(c == 200 for c in codes), codes
    # Serve replaced the killed replica: two replicas again, the dead one not among them.
    deadline = time.time() + 90
    while True:
        now = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if "SERVE_REPLICA" in a["name"] and f"simex-m-{app['name']}" in a["name"]]
        if len(now) == 2 and replicas[0]["name"] not in now:
            break
        assert time.time() < deadline, now
        time.sleep(0.2)
    assert serve.status().applications["simex"].status == "RUNNING"


def test_member_update_redeploys_only_what_changed(service):
    from ray import serve

    from simex_ray.fleet.build import train_fleet_local

    from simex_ray.fleet.plan import plan_fleet
    from simex_ray.training import TrainConfig

    before = {a: s.last_deployed_time_s for a, s in serve.status().applications.items()}
    stop, codes = threading.Event(), []
    t = threading.Thread(target=_hammer, args=(service, stop, codes))
    t.start()
    try:
        train_fleet_local(plan_fleet(["rotated:digits"], TrainConfig(epochs=1), samples=120), service.fleet)
        added = service.redeploy()
        assert len(added["added"]) == 1 and "rotated_digits" in added["added"][0]
        assert len(added["kept"]) == 2
        names = [m["name"] for m in requests.get(service.url + "/v1/members", timeout=30).json()["members"]]
        assert names == ["digits", "bgrand:digits", "rotated:digits"]
        assert set(post_npy(service, held_out()).json()["delta"]) == set(names)
        after = serve.status().applications
        for app in added["kept"]:
            assert after[app].last_deployed_time_s == before[app]  # untouched

        manifest = read_manifest(service.fleet)
        kept = [Member.from_json(m) for m in manifest["members"] if m["name"] != "rotated:digits"]
        write_manifest(service.fleet, kept)
        removed = service.redeploy()
        assert removed["removed"] == added["added"] and removed["added"] == []
    finally:
        stop.set()
        t.join()
    assert codes and all(c == 200 for c in codes), codes  # requests kept succeeding throughout
    names = [m["name"] for m in requests.get(service.url + "/v1/members", timeout=30).json()["members"]]
    assert names == ["digits", "bgrand:digits"]


def test_query_client(service):
    proc = subprocess.run([sys.executable, "-m", "simex_ray.cli", "query", "--url", service.url,
                           "--data", "bgrand:digits", "--samples", "120", "--batch", "50", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ds = data.balanced_sample(data.load("bgrand:digits"), 120, seed=0)
    expected = Fleet.load(service.fleet).score(ds.x)
    assert out["ranking"] == expected.ranking and out["n"] == 120
    for name, d in expected.delta.items():
        assert out["delta"][name] == pytest.approx(d, rel=1e-5)
    bad = subprocess.run([sys.executable, "-m", "simex_ray.cli", "query", "--url", "http://127.0.0.1:9",
                          "--data", "digits", "--samples", "10"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "cannot reach" in bad.stderr


def test_load_script_reports_side_by_side(service):
    proc = subprocess.run([sys.executable, "serve/load.py", "--url", service.url, "--fleet", str(service.fleet),
                           "--clients", "1,4", "--requests", "12", "--seconds", "10"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(l.startswith("in-process Fleet.score") for l in lines)
    assert any(l.startswith("HTTP /healthz, 8 clients") and int(l.split()[5]) == 0 for l in lines)
    http = [l for l in lines if l.startswith("HTTP, ")]
    assert len(http) == 2 and all(int(l.split()[3]) == 12 and int(l.split()[4]) == 0 for l in http)
    refused = subprocess.run([sys.executable, "serve/load.py", "--url", "http://10.1.2.3:8000", "--fleet", "x"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "loopback" in refused.stderr


def test_fused_layout_answers_like_the_member_apps_in_one_hop(service):
    from ray import serve

    x = held_out()
    before = post_npy(service, x).json()
    changes = service.redeploy(mode="fused", replicas=1)
    try:
        apps = serve.status().applications
        assert [a for a in apps if a.startswith("simex-fleet-")] and not [a for a in apps if a.startswith("simex-m-")]
        assert changes["removed"] and len(changes["added"]) == 1
        assert_same_answer(post_npy(service, x).json(), before)
        only = post_npy(service, x[:3], params={"per_sample": "true"}).json()
        assert len(only["per_sample"]["delta"]["bgrand:digits"]) == 3
    finally:
        service.redeploy()  # back to one application per member for the other tests
    assert not [a for a in serve.status().applications if a.startswith("simex-fleet-")]


def test_embedded_layout_scores_in_the_ingress_like_the_member_apps(service):
    from ray import serve

    x = held_out()
    before = post_npy(service, x).json()
    changes = service.redeploy(mode="embedded", replicas=1)
    try:
        apps = serve.status().applications
        # No scorer application at all: the ingress replica holds the fleet.
        assert not [a for a in apps if a.startswith(("simex-fleet-", "simex-m-"))], list(apps)
        assert changes["removed"] and not changes["added"]
        assert_same_answer(post_npy(service, x).json(), before)
        one = post_json(service, {"images": x[:3, 0].tolist(), "members": ["bgrand:digits"]},
                        params={"per_sample": "true"}).json()
        assert list(one["delta"]) == ["bgrand:digits"] and len(one["per_sample"]["delta"]["bgrand:digits"]) == 3
        # Concurrent requests are batched into one pass and each gets its own answer.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda k: post_npy(service, x[k:k + 5]).json(), range(8)))
        for k, a in enumerate(answers):
            assert a["n"] == 5
            assert a["delta"] == pytest.approx(post_npy(service, x[k:k + 5]).json()["delta"], rel=1e-5)
    finally:
        service.redeploy()
    assert [a for a in serve.status().applications if a.startswith("simex-m-")]


def test_deploy_checks_the_manifest_once_and_serves_that_copy(service, monkeypatch):
    """The driver reads and checks the manifest once (sha256 of every weight file, no model built) and
    deploys exactly that copy: the ingress aggregates with its records, not with a manifest rewritten
    on disk after the check (a retrain in between is not served unchecked)."""
    import simex_ray.fleet.fleet as fleet_module
    from simex_ray.fleet.manifest import verify_fleet

    built = []
    real = fleet_module.create_autoencoder
    monkeypatch.setattr(fleet_module, "create_autoencoder", lambda *a, **k: built.append(a) or real(*a, **k))
    x = held_out()
    before = post_npy(service, x).json()
    path = service.fleet / "manifest.json"
    original = path.read_text()
    checked = verify_fleet(service.fleet)
    assert checked == json.loads(original) and built == []  # hashed, not loaded
    tampered = json.loads(original)
    digits = next(m for m in tampered["members"] if m["name"] == "digits")
    digits["spec"], digits["calibration"]["mean"] = "tampered", digits["calibration"]["mean"] * 4
    path.write_text(json.dumps(tampered))
    try:
        # Other limits, so the ingress is reconfigured (and would read a manifest if it still did).
        changes = service.redeploy(manifest=checked, limits=Limits(max_images=500, max_body_bytes=4 << 20))
        assert built == [], "the driver built models while deploying"
        assert changes["added"] == changes["removed"] == [] and len(changes["kept"]) == 2
        assert post_npy(service, np.zeros((501, 28, 28), np.uint8)).status_code == 413  # the new config is live
        members = requests.get(service.url + "/v1/members", timeout=30).json()["members"]
        assert {m["name"]: m["spec"] for m in members}["digits"] == "digits"
        now = post_npy(service, x).json()
        assert_same_answer(now, before)  # delta_calibrated from the checked calibration, not the tampered one
        assert now["typicality"] == pytest.approx(before["typicality"], rel=1e-5, abs=1e-6)
    finally:
        path.write_text(original)
        service.redeploy()
    assert built == []
    assert post_npy(service, np.zeros((510, 28, 28), np.uint8)).status_code == 200


def cli_run(*args):
    return subprocess.run([sys.executable, "-m", "simex_ray.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_http_and_query_answer_every_field_alike(service):
    """The same 50 held-out images through `simex score --json`, POST /v1/score and `simex query --json`
    (one batch, and four batches merged)."""
    data = ("--data", "digits", "--split", "test", "--samples", "300")
    cli = cli_run("score", "--fleet", service.fleet, *data, "--json")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    assert expected["n"] == 50 and {"fleet", "data", "seconds"} <= set(expected)
    http = post_npy(service, held_out())
    assert http.status_code == 200, http.text
    assert "latency_ms" in http.json()
    assert expected["ranking_method"] == "typicality_latent" and None not in expected["typicality_latent"].values()
    assert_same_score(http.json(), expected)
    envelope = ("n", "image_format", "conversion")  # the request's envelope: the same in all three
    assert {k: http.json()[k] for k in envelope} == {k: expected[k] for k in envelope} \
        == {"n": 50, "image_format": "1x28x28", "conversion": None}  # digits are 1x28x28: nothing converted
    for batch in (50, 16):  # 16: batches of 16, 16, 16 and 2, merged by the client
        query = cli_run("query", "--url", service.url, *data, "--batch", batch, "--json")
        assert query.returncode == 0, query.stderr
        out = json.loads(query.stdout)
        assert {"url", "data", "seconds"} <= set(out)
        assert_same_score(out, expected)
        assert {k: out[k] for k in envelope} == {k: expected[k] for k in envelope}


def test_select_over_http_answers_like_the_cli(service, tmp_path):
    """POST /v1/select on the same deployment as /v1/score: the same scores as `simex select --json`, for a
    library of LeNet-5s and a user's own TorchScript classifier."""
    from simex_ray.transfer.library import add_classifier

    library = tmp_path / "lib"
    built = cli_run("train-bases", "--refs", "digits,bgrand:digits", "--samples", 240, "--no-ray", "--out", library)
    assert built.returncode == 0, built.stderr
    # ... and a classifier of the user's own zoo beside them: a TorchScript archive, trained on digits
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(7), torch.nn.Flatten(), torch.nn.Linear(49, 16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net), tmp_path / "mine.pt")
    add_classifier(library, arch="torchscript", weights=tmp_path / "mine.pt", n_classes=10, image_format="1x28x28",
                   source="digits")  # what `simex library add` does, without a new interpreter
    images, labels = data.prepare("digits", samples=300, seed=0)[1].x, data.prepare("digits", samples=300, seed=0)[1].y
    none = requests.post(service.url + "/v1/select", json={"images": images[:, 0].tolist()}, timeout=60)
    assert none.status_code == 404 and "--library" in none.json()["error"]
    try:
        service.redeploy(library=str(library))
        methods = ["simex", "logme", "knn", "entropy"]
        r = requests.post(service.url + "/v1/select", timeout=120, json={
            "images": images[:, 0].tolist(), "labels": labels.tolist(), "methods": methods})
        assert r.status_code == 200, r.text
        http = r.json()
        cli = cli_run("select", "--library", library, "--fleet", service.fleet, "--data", "digits", "--split", "test",
                      "--samples", 300, "--method", ",".join(methods), "--json")
        assert cli.returncode == 0, cli.stderr
        expected = json.loads(cli.stdout)
        assert http["ranking"] == expected["ranking"] and http["needs_labels"] == expected["needs_labels"]
        assert set(expected["scores"]["knn"]) == {"digits@s0", "bgrand:digits@s0", "mine"}
        for m in methods:
            for name, v in expected["scores"][m].items():
                assert http["scores"][m][name] == pytest.approx(v, rel=1e-5, abs=1e-9), (m, name)
        # Without labels only label-free methods run by default; asking for a label-using one is a 422.
        free = requests.post(service.url + "/v1/select", json={"images": images[:, 0].tolist()}, timeout=60).json()
        assert set(free["ranking"]) == {"simex", "entropy", "nuclear-norm", "silhouette", "energy", "mano"}
        bad = requests.post(service.url + "/v1/select", json={"images": images[:, 0].tolist(), "methods": ["logme"]},
                            timeout=60)
        assert bad.status_code == 422 and "labels" in bad.json()["error"]
        short = requests.post(service.url + "/v1/select", timeout=60,
                              json={"images": images[:, 0].tolist(), "labels": [0, 1]})
        assert short.status_code == 422 and "one per image" in short.json()["error"]
    finally:
        service.redeploy()
