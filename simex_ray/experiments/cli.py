"""`simex experiment inter-dataset|latency`: the paper's protocol I from the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    e = sub.add_parser("experiment", help="paper protocols (inter-dataset similarity, latency)")
    verbs = e.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    verbs.required = True

    def common(p):
        p.add_argument("--refs", required=True, help="comma-separated dataset specs (3 or more)")
        p.add_argument("--loss", choices=("mse", "issim"), default="mse")
        p.add_argument("--samples", type=int, default=600,
                       help="class-balanced samples per dataset before the 5:1 split (default 600; paper 6000)")
        p.add_argument("--test-samples", type=int, default=None,
                       help="held-out test images per dataset for Δ and accuracies (default: the protocol's; "
                            "the 'default' preset tops the 5:1 test split up to 1000)")
        p.add_argument("--epochs", type=int, default=None, help="autoencoder epochs (default: the protocol's)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--protocol", default="default",
                       help="preset name (default, paper) or a JSON file of ProtocolConfig fields")
        p.add_argument("--fleet", default=None, help="use this trained fleet instead of training one")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--data-dir", default=None)
        p.add_argument("--address", default=None, help="Ray cluster address; default: embedded local Ray")
        p.add_argument("--no-ray", action="store_true", help="run everything in this process")
        p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per classifier/transfer task")

    i = verbs.add_parser("inter-dataset", help="Δ vs transfer learning: Spearman ρ per base (Table 1, Fig. 4)")
    common(i)
    lt = verbs.add_parser("latency", help="SimEx query time vs transfer learning (Fig. 5)")
    common(lt)
    lt.add_argument("--unknown", required=True, help="the unknown dataset spec")
    lt.add_argument("--base", default=None, help="base dataset for transfer (default: first ref != unknown)")
    lt.add_argument("--repeats", type=int, default=5, help="repeated runs (default 5)")


UNIT_STAGES = {"train_base": "base-classifiers", "transfer": "transfer"}  # progress labels of the unit functions


def _protocol(text: str):
    from .inter_dataset import PRESETS, ProtocolConfig

    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"unknown protocol '{text}'; presets: {', '.join(PRESETS)}, or a JSON file")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"protocol file {text}: not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"protocol file {text}: need a JSON object of ProtocolConfig fields")
    # {"base": "default", "ae_optimizer": "adam"}: a preset with some fields changed (default base: paper).
    base = fields.pop("base", "paper")
    if base not in PRESETS:
        raise ValueError(f"protocol file {text}: unknown base '{base}'; presets: {', '.join(PRESETS)}")
    names = {f for f in ProtocolConfig.__dataclass_fields__}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"protocol file {text}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return ProtocolConfig.from_dict({**PRESETS[base].to_dict(), **fields})


def _progress(t0: float):
    last: dict[str, int] = {}

    def show(stage: str, done: int, total: int) -> None:
        if last.get(stage) == done:
            return
        last[stage] = done
        print(f"[{time.perf_counter() - t0:6.1f}s] {stage:<18} {done:>4}/{total}", file=sys.stderr, flush=True)

    return show


def cmd_experiment(args) -> int:
    from ..data import split_specs
    from ..distributed.runtime import ray_session

    protocol = _protocol(args.protocol)
    if args.test_samples is not None:
        protocol = dataclasses.replace(protocol, test_samples=args.test_samples)
    refs = split_specs(args.refs)
    out = Path(args.out)
    t0 = time.perf_counter()
    show = _progress(t0)
    fleet = args.fleet
    if args.experiment == "inter-dataset":
        from .inter_dataset import inter_dataset, write_inter_dataset

        def run(map_fn, base_map_fn=None):
            return inter_dataset(refs, loss=args.loss, samples=args.samples, epochs=args.epochs, seed=args.seed,
                                 data_dir=args.data_dir, protocol=protocol, map_fn=map_fn,
                                 base_map_fn=base_map_fn, on_progress=show, fleet=fleet)
        write = write_inter_dataset
    else:
        from .latency import latency, write_latency

        from .inter_dataset import PRESETS, TL_CONFIGS

        # Fig. 5 times every TL config; a protocol file may narrow them.
        tl = tuple(TL_CONFIGS) if args.protocol in PRESETS else protocol.tl_configs

        def run(map_fn, base_map_fn=None):  # timed units run one at a time, in this process: same machine, no contention
            return latency(refs, args.unknown, repeats=args.repeats, samples=args.samples, epochs=args.epochs,
                           seed=args.seed, data_dir=args.data_dir, loss=args.loss, base=args.base,
                           tl_configs=tl, protocol=protocol, on_progress=show, fleet=fleet)
        write = write_latency

    if args.no_ray:
        result = run(None)
    else:
        from ..distributed.map import ray_map, train_map
        from ..distributed.train import Resources, build_fleet

        with ray_session(args.address):
            if fleet is None:  # autoencoders on Ray Train, into OUT/fleet (re-used on a re-run)
                fleet = str(out / "fleet")
                build_fleet(refs, fleet, protocol.ae_config(args.loss, args.epochs, args.seed),
                            samples=args.samples, seed=args.seed, data_dir=args.data_dir,
                            resources=Resources(cpus_per_worker=args.cpus_per_task),
                            on_progress=lambda n, m: show(f"AE {n}"[:18], m["epoch"], m["epochs"]))
            # Base classifiers on Ray Train (checkpointed per classifier), transfers as Ray tasks.
            def unit(fn_name: str, done: int, total: int) -> None:
                show(UNIT_STAGES.get(fn_name, fn_name), done, total)

            result = run(ray_map(args.cpus_per_task, on_unit=unit),
                         train_map(Resources(cpus_per_worker=args.cpus_per_task), on_unit=unit))
    paths = write(result, out)
    print(json.dumps(_summary(result)))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def _summary(result: dict) -> dict:
    keys = ("references", "loss", "rho_per_base", "rho_mean", "rho_per_base_normalized", "rho_mean_normalized",
            "simex_seconds", "transfer_seconds", "speedup")
    out = {k: result[k] for k in keys if k in result}
    if "baselines" in result:
        out["baselines"] = {name: {k: v for k, v in b.items() if k.startswith("rho_mean")}
                            for name, b in result["baselines"].items()}
    return out
