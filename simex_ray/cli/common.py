"""What every `simex` verb shares: flag types and groups, the data-seed rule, reading unknown data,
progress lines, the score table, and the one rule that turns a failure into one line and an exit status."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Callable

from ..errors import one_line

log = logging.getLogger("simex")


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


def number_type(cast: Callable[[str], Any], *, minimum: float, strict: bool, what: str):
    """An argparse ``type`` reading a number above ``minimum`` (``strict``) or at least ``minimum``."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not (value > minimum if strict else value >= minimum):  # `not` also refuses NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


positive_int = number_type(int, minimum=0, strict=True, what="a positive integer")
non_negative_int = number_type(int, minimum=0, strict=False, what="a non-negative integer")
positive_float = number_type(float, minimum=0, strict=True, what="a positive number")


def spec_help() -> str:
    from .. import data

    return data.spec_help()


def add_seed_args(p: argparse.ArgumentParser, *, model_help: str | None = None,
                  data_help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=0,
                   help=model_help or "model seed: initialisation and shuffling; also the data seed unless "
                                      "--data-seed (default 0)")
    p.add_argument("--data-seed", type=int, default=None,
                   help=data_help or "data seed: sampling, splits, variant images (default: --seed)")


def add_data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="cache directory for downloaded datasets (default $SIMEX_DATA or ~/.cache/simex)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=positive_int, default=None,
                   help="draw N class-balanced samples per dataset (seeded), split 5:1 train/test")
    add_seed_args(p)
    add_data_dir_arg(p)


def add_device_arg(p: argparse.ArgumentParser, help: str = "where the autoencoders run (default cpu; "
                                                            "auto = cuda when present)") -> None:
    from ..choices import DEVICES

    p.add_argument("--device", choices=DEVICES, default="cpu", help=help)


def add_loss_arg(p: argparse.ArgumentParser, *, default: str | None = None, extra: tuple[str, ...] = (),
                 help: str | None = None) -> None:
    from ..choices import LOSSES

    p.add_argument("--loss", choices=(*LOSSES, *extra), default=default, help=help)


def add_address_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--address", default=default,
                   help="Ray cluster address (e.g. auto, ray://host:10001); default: "
                        + (default or "embedded local Ray"))


def data_seed(args, fallback: int | None = None) -> int:
    """--data-seed; else ``fallback`` (e.g. a ground truth's data seed); else --seed."""
    if getattr(args, "data_seed", None) is not None:
        return args.data_seed
    return fallback if fallback is not None else args.seed


def split_members(text: str | None) -> list[str] | None:
    """A comma-separated --members flag: the names, or None for every member."""
    names = [n.strip() for n in text.split(",") if n.strip()] if text else []
    return names or None


def add_strict_format_arg(p) -> None:
    p.add_argument("--strict-format", action="store_true",
                   help="refuse data that is not in the fleet's image format instead of converting it")


def ray_trainer(*, cpus_per_task: float, data_seed: int, data_dir, show: Callable[[str, int, int], None]):
    """The studies' :data:`~simex_ray.experiments.fleets.FleetTrainer` on Ray Train (inside a Ray session):
    each fleet trained, or resumed, by :func:`simex_ray.distributed.train.build_fleet`."""
    from ..distributed.train import Resources, build_fleet

    def train(refs, path, config, samples, per_class):
        build_fleet(refs, path, config, samples=samples, per_class=per_class, seed=data_seed, data_dir=data_dir,
                    resources=Resources(cpus_per_worker=cpus_per_task),
                    on_progress=lambda n, m: show(f"AE {n}", m["epoch"], m["epochs"]))
    return train


def clock(t0: float) -> str:
    return f"[{time.perf_counter() - t0:6.1f}s]"


def epoch_printer(t0: float, names=()) -> Callable[[str, dict], None]:
    """An ``on_epoch(member, metrics)`` printer for fleet training."""
    from ..names import display_names

    shown = display_names(names)
    width = max([len(v) for v in shown.values()] + [12])

    def show(member: str, m: dict) -> None:
        name = shown.get(member) or display_names([member, *shown])[member]
        print(f"{clock(t0)} {name:<{width}} epoch {m['epoch']:>3}/{m['epochs']:<3} "
              f"train Δ {m['train_delta']:.5f}  test Δ {m['test_delta']:.5f}", file=sys.stderr, flush=True)
    return show


def stage_printer(t0: float, names=()) -> Callable[[str, int, int], None]:
    """A ``(stage, done, total)`` printer; stage names that are specs are shown by the display rule."""
    from ..names import display_names

    shown = display_names(names)
    last: dict[str, int] = {}

    def show(stage: str, done: int, total: int) -> None:
        if last.get(stage) == done:
            return
        last[stage] = done
        label = " ".join(shown.get(w, w) for w in stage.split(" "))
        print(f"{clock(t0)} {label:<24} {done:>4}/{total}", file=sys.stderr, flush=True)

    return show


def format_score(result, title: str) -> str:
    """The score as a table: every measure, in the order of ``result.ranking``, and the composition."""
    from ..fleet.result import WEAK_AGREEMENT
    from ..names import display_names

    def num(v, fmt="{:>10.5f}"):
        return fmt.format(v) if v is not None else f"{'-':>10}"

    shown = display_names(result.delta)
    share = "share" if result.composition_method == "matching" else "nearest"
    width = max(len(n) for n in shown.values())
    lines = [title, f"{'rank':>4}  {'reference Y':<{width}}  {'Δ':>10}  {'Δ / |Y|':>10}  {'Δ / Δ(Y|Y)':>10}  "
                    f"{'in dist.':>10}  {'distrib.':>10}  {'typ.+lat.':>10}  {share:>8}"]
    for rank, name in enumerate(result.ranking, 1):
        lines.append(f"{rank:>4}  {shown[name]:<{width}}  {num(result.delta[name])}  "
                     f"{num(result.delta_normalized[name])}  {num(result.delta_calibrated.get(name))}  "
                     f"{num(result.in_distribution.get(name), '{:>10.1%}')}  "
                     f"{num(result.distribution.get(name), '{:>10.4f}')}  "
                     f"{num(result.typicality_latent.get(name), '{:>10.4f}')}  "
                     f"{result.composition.get(name, 0):>8.1%}")
    lines.append(f"most similar: {result.ranking[0]} (ranking: {result.method}; agreement {result.agreement:.0%}"
                 + (f", margin {result.margin:.4g}" if result.margin is not None else "")
                 + ("; 'share' = estimated share of X from each reference (distribution matching))"
                    if result.composition_method == "matching" else
                    "; 'nearest' = share of samples nearest to each reference)"))
    if not result.confident:
        lines.append(f"weak answer: fewer than {WEAK_AGREEMENT:.0%} of the rankings put {result.ranking[0]} first "
                     f"(agreement {result.agreement:.0%}); compare the rankings (--json) before trusting it")
    return "\n".join(lines)


def run_cli(fn: Callable[[], int], prog: str, *, debug: bool = False) -> int:
    """Run ``fn``; turn every failure into one line on stderr and an exit status."""
    from ..data import DataUnavailable
    from ..errors import FleetError, OperationalError, UserError

    try:
        return fn()
    except (UserError, UsageError) as e:  # the product's own: a mistake the user can fix (SpecError too)
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (DataUnavailable, FleetError, OperationalError, OSError) as e:  # the data, the fleet, the cluster, the OS
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never show a raw traceback to a user, nor blame them for a bug
        if debug:
            raise
        print(f"{prog}: internal error (a bug in simex-ray, not in your input): {type(e).__name__}: "
              f"{one_line(e)}; re-run with --debug for the traceback and report it", file=sys.stderr)
        return 1


def print_json(obj: Any) -> None:
    import json

    print(json.dumps(obj))
