"""`simex experiment inter-class|augment`: the paper's per-class studies from the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from .common import add_address_arg, add_data_dir_arg, add_loss_arg, ray_trainer, stage_printer
from .common import data_seed as resolve_data_seed
from ..errors import UserError


def _common(p) -> None:
    p.add_argument("--out", required=True, help="output directory (re-use it to resume: trained fleets are kept)")
    p.add_argument("--preset", default=None,
                   help="sizes: default (minutes on 2 cores), paper, tiny, or a JSON file of settings")
    p.add_argument("--seed", type=int, default=0, help="model seed (default 0)")
    p.add_argument("--data-seed", type=int, default=None, help="data seed: samples and splits (default: --seed)")
    p.add_argument("--image-format", default=None, metavar="CxHxW",
                   help="every image in this format, converted by the rule (default: the preset's, 1x28x28)")
    add_data_dir_arg(p)
    add_address_arg(p)
    p.add_argument("--no-ray", action="store_true", help="run everything in this process")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per autoencoder/classifier run (default 1)")


def add_parsers(verbs) -> None:
    ic = verbs.add_parser("inter-class", help="Δ vs inter-class confusion of 9-class classifiers (Table 2, Fig. 8)",
                          description="Per-class fleet of one labelled dataset; its Δ matrix, the sample-space "
                                      "matrices and the confusion of leave-one-class-out LeNet-5 and ResNet-18 "
                                      "classifiers (Ray Train); Table 2 = mean Spearman ρ per class.")
    ic.add_argument("--data", required=True, help="a labelled dataset spec")
    add_loss_arg(ic, default="both", extra=("both",),
                    help="autoencoder loss: one per-class fleet per loss, each a SimEx row of Table 2 (default both)")
    ic.add_argument("--samples-per-class", type=int, default=None,
                    help="images per class before the 5:1 split (default: the preset's)")
    ic.add_argument("--fleet", default=None,
                    help="use this trained per-class fleet (only with a single --loss)")
    _common(ic)
    ag = verbs.add_parser("augment", help="augment a small training set with paired reference classes (Fig. 7)",
                          description="A 10-class LeNet-5 trained on n target samples per class plus m samples of "
                                      "each class's paired reference class (pairing by simex, sample-mse and "
                                      "embeddings); accuracy on held-out target samples.")
    ag.add_argument("--target", required=True, help="the labelled target dataset spec (the small training set)")
    ag.add_argument("--refs", required=True, help="comma-separated labelled reference specs to borrow from")
    ag.add_argument("--n", default=None, help="target samples per class, comma-separated (default: the preset's)")
    ag.add_argument("--m", default=None, help="borrowed samples per class, comma-separated (default: the preset's)")
    ag.add_argument("--trials", type=int, default=None, help="trials per point (default: the preset's)")
    ag.add_argument("--methods", default=None, help="pairing methods, comma-separated (default all three)")
    add_loss_arg(ag, default="mse", help="autoencoder loss (default mse)")
    _common(ag)


def cmd(args) -> int:
    from ..data import split_specs
    from ..distributed.runtime import ray_session
    from ..losses import LOSSES
    from ..protocol import jsonable

    data_seed = resolve_data_seed(args)
    out = Path(args.out)
    if args.experiment == "inter-class":
        from ..experiments.inter_class import format_table2, inter_class, load_config, write_inter_class

        cfg = load_config(args.preset)
        if args.samples_per_class is not None:
            cfg = dataclasses.replace(cfg, samples_per_class=args.samples_per_class)
        if args.image_format:
            cfg = dataclasses.replace(cfg, image_format=args.image_format)
        losses = LOSSES if args.loss == "both" else (args.loss,)
        if args.fleet and len(losses) > 1:
            raise UserError("--fleet holds one loss's per-class fleet; pass --loss mse or --loss issim with it")
        fleets = {l: args.fleet or str(out / f"fleet-{l}") for l in losses}
        show = stage_printer(time.perf_counter(), [args.data])

        def run(map_fn, trainer=None):
            return inter_class(args.data, losses=losses, config=cfg, data_seed=data_seed, model_seed=args.seed,
                               data_dir=args.data_dir, fleets=fleets, map_fn=map_fn, on_progress=show,
                               trainer=trainer)

        if args.no_ray:
            result = run(None)
        else:
            from ..distributed.map import train_map
            from ..distributed.train import Resources

            with ray_session(args.address):  # per-class autoencoders on Ray Train, kept for a re-run
                result = run(train_map(Resources(cpus_per_worker=args.cpus_per_task),
                                       on_unit=lambda fn, d, t: show("classifiers", d, t)),
                             ray_trainer(cpus_per_task=args.cpus_per_task, data_seed=data_seed,
                                         data_dir=args.data_dir, show=show))
        paths = write_inter_class(result, out)
        print(format_table2(result), file=sys.stderr)
        print(json.dumps(jsonable({"data": result["data"], "table2": result["table2"],
                                   "table2_transposed": result["table2_transposed"],
                                   "table2_calibrated": result["table2_calibrated"],
                                   "classifier_accuracy": {a: c["mean_accuracy"]
                                                           for a, c in result["classifiers"].items()},
                                   "seconds": result["seconds"]["total"]})))
    else:
        from ..experiments.augment import augment, format_augment, load_config as load_augment, write_augment

        cfg = load_augment(args.preset, n=args.n, m=args.m, trials=args.trials, methods=args.methods)
        if args.image_format:
            cfg = dataclasses.replace(cfg, image_format=args.image_format)
        refs = split_specs(args.refs)
        show = stage_printer(time.perf_counter(), [args.target, *refs])

        def run(map_fn, trainer=None):
            return augment(args.target, refs, config=cfg, loss=args.loss, data_seed=data_seed, model_seed=args.seed,
                           data_dir=args.data_dir, fleet_dir=out / "fleets", map_fn=map_fn, trainer=trainer,
                           on_progress=show)

        if args.no_ray:
            result = run(None)
        else:
            from ..distributed.map import ray_map

            with ray_session(args.address):
                result = run(ray_map(args.cpus_per_task, on_unit=lambda fn, d, t: show("trials", d, t)),
                             ray_trainer(cpus_per_task=args.cpus_per_task, data_seed=data_seed,
                                         data_dir=args.data_dir, show=show))
        paths = write_augment(result, out)
        print(format_augment(result), file=sys.stderr)
        print(json.dumps(jsonable({"target": result["target"], "references": result["references"],
                                   "gain": result["gain"], "order": result["order"],
                                   "seconds": result["seconds"]["total"]})))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
