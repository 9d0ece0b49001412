"""`simex experiment transfer|inter-dataset|latency`: the paper's protocol I from the command line.

The per-class studies (`inter-class`, `augment`) live in :mod:`.per_class`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from .common import add_address_arg, add_data_dir_arg, add_loss_arg, ray_trainer, stage_printer
from .common import data_seed as resolve_data_seed

DEFAULT_SAMPLES = 600


def add_common(p, *, refs_required: bool = True) -> None:
    p.add_argument("--refs", required=refs_required, help="comma-separated dataset specs (3 or more)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"class-balanced samples per dataset before the 5:1 split (default {DEFAULT_SAMPLES}, "
                        "or the ground truth's; paper 6000)")
    p.add_argument("--test-samples", type=int, default=None,
                   help="held-out test images per dataset for Δ and accuracies (default: the protocol's; "
                        "the 'default' preset tops the 5:1 test split up to 1000)")
    p.add_argument("--seed", type=int, default=0, help="model seed: autoencoder and classifier initialisation (0)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="data seed: samples, splits, variant images (default: --seed, or the ground truth's)")
    p.add_argument("--protocol", default=None,
                   help="preset (default, paper, last-layer, few-shot, finetune) or a JSON file of ProtocolConfig "
                        "fields (default: the ground truth's, else 'few-shot' for transfer and 'default' otherwise)")
    p.add_argument("--image-format", default=None, metavar="CxHxW",
                   help="every image in this format, converted by the rule (default: the protocol's, 1x28x28)")
    p.add_argument("--out", required=True, help="output directory")
    add_data_dir_arg(p)
    add_address_arg(p)
    p.add_argument("--no-ray", action="store_true", help="run everything in this process")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per classifier/transfer task")


def add_parsers(sub) -> None:
    e = sub.add_parser("experiment", help="paper protocols (transfer ground truth, inter-dataset similarity, latency, "
                                           "inter-class similarity, augmentation)")
    verbs = e.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    verbs.required = True

    def with_fleet(p):
        add_common(p)
        add_loss_arg(p, default="mse")
        p.add_argument("--epochs", type=int, default=None, help="autoencoder epochs (default: the protocol's)")
        p.add_argument("--fleet", default=None, help="use this trained fleet instead of training one")

    gt = verbs.add_parser("transfer", help="compute the transfer-learning ground truth once (reused by "
                                           "inter-dataset and the Tune study)")
    add_common(gt)
    i = verbs.add_parser("inter-dataset", help="Δ vs transfer learning: Spearman ρ per base (Table 1, Fig. 4)")
    with_fleet(i)
    i.add_argument("--ground-truth", default=None,
                   help="reuse this ground truth directory (from `simex experiment transfer`): no classifier trained")
    lt = verbs.add_parser("latency", help="SimEx query time vs transfer learning (Fig. 5)")
    with_fleet(lt)
    lt.add_argument("--unknown", required=True, help="the unknown dataset spec")
    lt.add_argument("--base", default=None, help="base dataset for transfer (default: first ref != unknown)")
    lt.add_argument("--repeats", type=int, default=5, help="repeated runs (default 5)")
    from .per_class import add_parsers as add_per_class

    add_per_class(verbs)


UNIT_STAGES = {"train_base": "base-classifiers", "train_base_group": "base-classifiers", "transfer": "transfer",
               "finetune": "transfer"}


def resolve_protocol(args, ground_truth=None):
    """--protocol / --test-samples, or the ground truth's protocol when none is named."""
    from ..protocol import DEFAULT, PRESETS, STUDY_PROTOCOL, ProtocolConfig, load_protocol

    if args.protocol is not None:
        protocol = load_protocol(args.protocol)
    elif ground_truth is not None:
        protocol = ProtocolConfig.from_dict(ground_truth.protocol)
    elif args.experiment == "transfer":  # a ground truth for the Tune study: the one with the most signal
        protocol = PRESETS[STUDY_PROTOCOL]
    else:
        protocol = DEFAULT
    if args.test_samples is not None:
        protocol = dataclasses.replace(protocol, test_samples=args.test_samples)
    if getattr(args, "image_format", None):
        from ..formats import ImageFormat

        protocol = dataclasses.replace(protocol, image_format=str(ImageFormat.parse(args.image_format)))
    return protocol


def cmd_experiment(args) -> int:
    if args.experiment in ("inter-class", "augment"):
        from .per_class import cmd

        return cmd(args)
    from ..data import split_specs
    from ..distributed.runtime import ray_session
    from ..transfer.ground_truth import GroundTruth, compute_ground_truth
    from ..protocol import PRESETS, canonical_refs

    gt = GroundTruth.load(args.ground_truth) if getattr(args, "ground_truth", None) else None
    protocol = resolve_protocol(args, gt)
    refs = canonical_refs(split_specs(args.refs))
    samples = args.samples if args.samples is not None else gt.samples if gt is not None else DEFAULT_SAMPLES
    data_seed = resolve_data_seed(args, gt.data_seed if gt is not None else None)
    if gt is not None:  # a mismatch is a one-line error before any slow work
        gt.check(refs=refs, samples=samples, data_seed=data_seed, protocol=protocol)
    out = Path(args.out)
    show = stage_printer(time.perf_counter(), refs)
    fleet = getattr(args, "fleet", None)

    def fleet_dir(trainer):  # on Ray, autoencoders train into OUT/fleet (re-used on a re-run); here, a temporary one
        return str(out / "fleet") if trainer is not None else None

    if args.experiment == "transfer":
        def run(map_fn, base_map_fn=None, trainer=None):
            return compute_ground_truth(refs, samples=samples, data_seed=data_seed, model_seed=args.seed,
                                        data_dir=args.data_dir, protocol=protocol, map_fn=map_fn,
                                        base_map_fn=base_map_fn, on_progress=show)

        def write(result, out_dir):
            return result.save(out_dir)
    elif args.experiment == "inter-dataset":
        from ..experiments.inter_dataset import inter_dataset, write_inter_dataset

        def run(map_fn, base_map_fn=None, trainer=None):
            return inter_dataset(refs, loss=args.loss, samples=samples, epochs=args.epochs, data_seed=data_seed,
                                 model_seed=args.seed, data_dir=args.data_dir, protocol=protocol, map_fn=map_fn,
                                 base_map_fn=base_map_fn, on_progress=show, fleet=fleet, ground_truth=gt,
                                 save_ground_truth=None if gt is not None else out / "ground_truth",
                                 fleet_dir=fleet_dir(trainer), trainer=trainer)
        write = write_inter_dataset
    else:
        from ..transfer.learning import TL_CONFIGS
        from ..experiments.latency import latency, write_latency

        # Fig. 5 times every TL config; a protocol file may narrow them.
        tl = tuple(TL_CONFIGS) if args.protocol in (None, *PRESETS) else protocol.tl_configs

        def run(map_fn, base_map_fn=None, trainer=None):  # timed units run one at a time, here: no contention
            return latency(refs, args.unknown, repeats=args.repeats, samples=samples, epochs=args.epochs,
                           data_seed=data_seed, model_seed=args.seed, data_dir=args.data_dir, loss=args.loss,
                           base=args.base, tl_configs=tl, protocol=protocol, on_progress=show, fleet=fleet,
                           fleet_dir=fleet_dir(trainer), trainer=trainer)
        write = write_latency

    if args.no_ray:
        result = run(None)
    else:
        from ..distributed.map import ray_map, train_map
        from ..distributed.train import Resources

        with ray_session(args.address):
            trainer = ray_trainer(cpus_per_task=args.cpus_per_task, data_seed=data_seed, data_dir=args.data_dir,
                                  show=show)
            needs_classifiers = args.experiment != "inter-dataset" or gt is None

            def unit(fn_name: str, done: int, total: int) -> None:
                show(UNIT_STAGES.get(fn_name, fn_name), done, total)

            # Base classifiers on Ray Train (checkpointed per classifier), transfers as Ray tasks.
            result = run(ray_map(args.cpus_per_task, on_unit=unit) if needs_classifiers else None,
                         train_map(Resources(cpus_per_worker=args.cpus_per_task), on_unit=unit)
                         if needs_classifiers else None, trainer=trainer)
    paths = write(result, out)
    from ..protocol import jsonable

    if isinstance(result, dict) and result.get("selection_table"):
        from ..experiments.inter_dataset import format_selection_table

        print("methods side by side (ρ against the same ground truth):", file=sys.stderr)
        print(format_selection_table(result["selection_table"]), file=sys.stderr)

    print(json.dumps(jsonable(summary(result))))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def summary(result) -> dict:
    """The headline numbers, printed as one JSON line on stdout."""
    from ..transfer.ground_truth import GroundTruth

    if isinstance(result, GroundTruth):
        return {"references": result.references, "target": result.target_name, "snr": result.snr()["snr"],
                "own_base_best": result.snr()["own_base_best"], "base_seconds": result.base_seconds,
                "transfer_accuracy": result.accuracy.tolist()}
    keys = ("references", "loss", "rho_per_base", "rho_mean", "rho_mean_strict", "rho_per_base_normalized",
            "rho_mean_normalized", "rho_mean_strict_normalized", "rho_mean_gain", "simex_seconds",
            "transfer_seconds", "speedup")
    out = {k: result[k] for k in keys if k in result}
    if "ground_truth" in result:
        out["ground_truth"] = {k: result["ground_truth"][k] for k in ("path", "reused")}
        out["ground_truth"]["snr"] = result["ground_truth"]["snr"]["snr"]
    if "baselines" in result:
        out["baselines"] = {name: {k: v for k, v in b.items() if k.startswith("rho_mean")}
                            for name, b in result["baselines"].items()}
    if result.get("selection_table"):
        out["selection_table"] = result["selection_table"]
    return out


COMMANDS = {"experiment": cmd_experiment}
