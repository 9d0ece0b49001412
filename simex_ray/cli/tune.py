"""`simex tune stopping`: the early-stopping study (Fig. 6) on Ray Tune."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from .common import add_address_arg, add_data_dir_arg, add_loss_arg
from ..errors import UserError


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--lrs: expected comma-separated numbers, got '{text}'") from None
    if not values or any(not v > 0 for v in values):
        raise UserError(f"--lrs: expected positive learning rates, got '{text}'")
    return values


def add_parsers(sub) -> None:
    t = sub.add_parser("tune", help="Ray Tune studies (early stopping of the autoencoder fleet)")
    verbs = t.add_subparsers(dest="study", metavar="STUDY")
    verbs.required = True
    s = verbs.add_parser("stopping", help="how early may autoencoder training stop before the ρ ordering is stable",
                         description="Each trial (optimizer, lr, model seed) trains the whole fleet one epoch at a "
                                     "time and reports ρ against a cached transfer ground truth after each epoch. "
                                     "Re-running the same command resumes an interrupted study.")
    s.add_argument("--ground-truth", required=True, help="directory from `simex experiment transfer`")
    s.add_argument("--refs", default=None, help="comma-separated specs (default: the ground truth's)")
    add_loss_arg(s, default="mse")
    s.add_argument("--optimizers", default="rmsprop", help="comma-separated (default rmsprop)")
    s.add_argument("--lrs", default="1e-3,2e-4", help="comma-separated learning rates (default 1e-3,2e-4)")
    s.add_argument("--configs", default=None,
                   help="explicit optimizer:lr pairs instead of the optimizers x lrs grid, e.g. "
                        "rmsprop:2e-4,rmsprop:1e-3,adam:1e-3")
    s.add_argument("--seeds", type=int, default=3, help="model seeds per configuration (default 3)")
    s.add_argument("--max-epochs", type=int, default=20, help="epochs per trial (default 20)")
    s.add_argument("--stop-when-stable", action="store_true",
                   help="end each trial at its earliest stable epoch (default: full curves to --max-epochs)")
    s.add_argument("--eps", type=float, default=0.05, help="stability band: max - min of ρ (default 0.05)")
    s.add_argument("--k", type=int, default=3, help="epochs ρ must stay in the band (default 3)")
    s.add_argument("--metric", choices=("rho_mean", "rho_mean_strict", "rho_mean_gain"), default="rho_mean",
                   help="ρ to follow: the paper's (base included, default) or strict (X != Y)")
    s.add_argument("--eval-samples", type=int, default=500,
                   help="evaluation images per dataset from the ground truth's test split (default 500; 0 = all)")
    s.add_argument("--cpus-per-trial", type=float, default=1.0)
    s.add_argument("--gpus-per-trial", type=float, default=0.0)
    s.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (default 2)")
    s.add_argument("--storage", default=None, help="where Tune keeps trials and checkpoints (default OUT); "
                                                   "on a multi-node cluster: shared storage or a URI")
    add_address_arg(s)
    add_data_dir_arg(s)
    s.add_argument("--out", required=True, help="study directory: stopping.json/.parquet/.png (re-use to resume)")


def _configs(args) -> list[tuple[str, float]]:
    from ..training import OPTIMIZERS

    if args.configs:
        pairs = []
        for item in args.configs.split(","):
            name, _, lr = item.strip().partition(":")
            if not lr:
                raise UserError(f"--configs: expected optimizer:lr, got '{item}'")
            pairs.append((name, _floats(lr)[0]))
    else:
        pairs = [(o.strip(), lr) for o in args.optimizers.split(",") if o.strip() for lr in _floats(args.lrs)]
    for name, _ in pairs:
        if name not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
    if len(set(pairs)) != len(pairs):
        raise UserError("a configuration is given twice")
    return pairs


SETTINGS = "study_settings.json"


def _check_settings(out: Path, settings: dict) -> None:
    """A study directory resumes only the study it holds: other settings are a one-line error."""
    from ..fleet import atomic_write_bytes

    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{out} holds a study with other settings ({', '.join(diff)}: {old.get(k)} there, "
                             f"{settings[k]} asked); re-run it as it was to resume, or use another --out")
        return
    atomic_write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


def cmd_tune(args) -> int:
    from ..data import split_specs
    from ..distributed.runtime import ray_session
    from ..transfer.ground_truth import GroundTruth
    from ..protocol import canonical_refs, jsonable
    from ..experiments.stopping import StabilityRule, study_data, summarize, write_study

    for flag in ("seeds", "max_epochs", "k"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    configs = _configs(args)
    rule = StabilityRule(args.eps, args.k)
    gt = GroundTruth.load(args.ground_truth)
    if args.metric == "rho_mean_gain" and gt.gain is None:
        raise UserError("--metric rho_mean_gain needs a ground truth of the finetune protocol")
    refs = canonical_refs(split_specs(args.refs)) if args.refs else None
    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    print(f"[{0:6.1f}s] loading {len(refs or gt.references)} datasets as the ground truth did "
          f"({gt.samples} samples, data seed {gt.data_seed})", file=sys.stderr, flush=True)
    study = study_data(gt, refs, loss=args.loss, eval_samples=args.eval_samples or None, data_dir=args.data_dir)
    seeds = list(range(args.seeds))
    print(f"[{time.perf_counter() - t0:6.1f}s] {len(configs)} configuration(s) x {len(seeds)} seed(s), "
          f"up to {args.max_epochs} epochs each; ground truth SNR {gt.snr()['snr']:.2f}", file=sys.stderr, flush=True)
    _check_settings(out, {
        "ground_truth_sha256": hashlib.sha256((gt.path / "ground_truth.json").read_bytes()).hexdigest(),
        "references": study.references, "loss": args.loss, "configs": [list(c) for c in configs], "seeds": seeds,
        "max_epochs": args.max_epochs, "stop_when_stable": args.stop_when_stable, "eps": args.eps, "k": args.k,
        "metric": args.metric, "eval_samples": args.eval_samples or None})
    from ..distributed.tune import StudyError, run_study

    with ray_session(args.address):
        try:
            rows = run_study(study, configs, seeds, max_epochs=args.max_epochs, storage=args.storage or str(out),
                             rule=rule if args.stop_when_stable else None, metric=args.metric,
                             cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                             max_failures=args.max_failures)
            failure = None
        except StudyError as e:
            rows, failure = e.rows, e
    summary = summarize(rows, rule, metric=args.metric, base_seconds=gt.base_seconds)
    summary.update({"references": study.references, "loss": args.loss, "ground_truth": str(gt.path),
                    "ground_truth_snr": gt.snr()["snr"], "samples": gt.samples, "data_seed": gt.data_seed,
                    "eval_samples": {r: len(x) for r, x in study.evaluate.items()},
                    "max_epochs": args.max_epochs, "stop_when_stable": args.stop_when_stable,
                    "architecture": study.train_config["architecture"],
                    "batch_size": study.train_config["batch_size"], "seconds": time.perf_counter() - t0})
    paths = write_study(summary, rows, out)
    best = summary["best"]
    line = {"best": best, "configs": {k: {f: c[f] for f in ("earliest_stable_epoch", "earliest_stable_seconds",
                                                            "final_rho")} for k, c in summary["configs"].items()},
            "fastest_base_seconds": summary["fastest_base_seconds"],
            "stable_over_fastest_base": summary.get("stable_over_fastest_base")}
    print(json.dumps(jsonable(line)))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if failure is not None:
        raise failure
    return 0


COMMANDS = {"tune": cmd_tune}
