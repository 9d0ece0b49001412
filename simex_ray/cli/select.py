"""`simex select` (which of my classifiers should I transfer from?) and `simex train-bases` (build the
classifier library)."""

from __future__ import annotations

import contextlib
import json
import sys
import time

from .common import (UsageError, add_address_arg, add_data_args, add_device_arg, add_loss_arg, data_seed,
                     positive_float, positive_int, spec_help, stage_printer)


def add_parsers(sub) -> None:
    from ..choices import FEATURE_BLOCK, FEATURE_WHERE, LABEL_FREE_METHODS, SELECTION_METHODS as METHODS

    labelled = [m for m in METHODS if m not in LABEL_FREE_METHODS]
    free = [m for m in LABEL_FREE_METHODS if m != "simex"]
    s = sub.add_parser("select", help="rank a library's pretrained classifiers for a dataset (which to transfer from)",
                       description="Score every classifier of a library (from `simex train-bases`, `simex library "
                                   "add` or `simex experiment transfer`'s OUT/ground_truth/library) for unknown "
                                   "data: simex (-Δ through the fleet, no labels) and the transferability estimators "
                                   f"({', '.join(labelled)} need labels; {', '.join(free)} do not). Higher score "
                                   "= better transfer.")
    s.add_argument("--library", required=True, help="classifier library directory or URI")
    s.add_argument("--data", required=True, help=spec_help())
    s.add_argument("--fleet", default=None, help="fleet of the library's references (for --method simex)")
    s.add_argument("--method", default="all",
                   help=f"comma-separated methods of {', '.join(METHODS)}, or all (default: every method the "
                        f"data and flags allow: label-using ones when the data has labels, simex with --fleet)")
    s.add_argument("--split", choices=("all", "train", "test"), default="all",
                   help="score all samples, or the train/test part of the 5:1 split")
    s.add_argument("--verify", type=positive_int, default=None, metavar="K",
                   help="transfer the best classifier of each of the top K references of the first method for "
                        "real and report their accuracy (needs labels; Ray tasks unless --no-ray)")
    s.add_argument("--protocol", default=None,
                   help="preset or JSON file whose transfer settings --verify uses (default: 'default'; 'few-shot': "
                        "10 labelled images per class)")
    s.add_argument("--no-ray", action="store_true", help="run --verify's transfers in this process")
    add_address_arg(s)
    s.add_argument("--features", choices=FEATURE_WHERE, default="auto",
                   help="where the classifiers' outputs are computed: ray (Ray Data actor pools, the workers "
                        "reading parquet/npz slices themselves), here (this process), or auto (default: ray "
                        "with --address, else here)")
    s.add_argument("--feature-cache", default=None, metavar="DIR|none",
                   help="keep each classifier's outputs per (weights, exact images, layer) in DIR (path or URI) "
                        "and reuse them (default: LIBRARY/features when the library is a writable local "
                        "directory, else no cache; none: no cache)")
    s.add_argument("--layer", default=None,
                   help="the features the estimators read: a module name of every classifier (e.g. head.3) "
                        "(default: each classifier's own: the layer it was added with, else the input of its "
                        "final Linear)")
    s.add_argument("--cpus-per-actor", type=positive_float, default=1.0,
                   help="with Ray features on a cluster without GPUs: CPUs per feature actor (default 1; "
                        "with GPUs each actor takes one)")
    s.add_argument("--batch-images", type=positive_int, default=FEATURE_BLOCK,
                   help=f"with Ray features: images per slice, one actor's input (default {FEATURE_BLOCK})")
    add_loss_arg(s, help="override the fleet's delta (simex)")
    s.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_device_arg(s, help="where the autoencoders and the classifiers run (default cpu; auto = cuda when present)")
    add_data_args(s)

    b = sub.add_parser("train-bases", help="train a library of base classifiers B(Y), one per reference (Ray Train)",
                       description="Train one LeNet-5 classifier per reference and classifier seed on its labelled "
                                   "5:1 split, as the transfer ground truth does, and keep them as a library. "
                                   "Re-running the same command resumes: finished classifiers are kept.")
    b.add_argument("--refs", required=True, help="comma-separated labelled reference specs; " + spec_help())
    b.add_argument("--out", required=True, help="library directory or URI (created; re-use to resume)")
    b.add_argument("--seeds", type=positive_int, default=1, help="classifier seeds per reference (default 1)")
    b.add_argument("--protocol", default=None,
                   help="preset or JSON file whose classifier settings to use (default: 'default')")
    b.add_argument("--image-format", default="auto", metavar="auto|CxHxW",
                   help="the classifiers' image format (default auto: the references' common native format)")
    b.add_argument("--cpus-per-task", type=positive_float, default=1.0, help="CPUs per classifier run (default 1)")
    b.add_argument("--members-per-pass", type=positive_int, default=None, metavar="N",
                   help="classifiers alike (optimizer, lr, batch size, classes, format; seed, epochs and patience "
                        "may differ) trained together in one fused forward and backward pass (default: as many as "
                        "keep the pass's activations within 256 MiB, and few enough that every Ray Train run gets "
                        "some; 1: one classifier after another)")
    b.add_argument("--no-ray", action="store_true", help="train in this process")
    add_address_arg(b)
    add_data_args(b)


def resolve_methods(text: str, *, labelled: bool, fleet: bool) -> list[str]:
    from ..transfer.selection import available_methods

    if text.strip() == "all":
        return available_methods(labelled=labelled, fleet=fleet)
    return [m.strip() for m in text.split(",") if m.strip()]


def cmd_select(args) -> int:
    from .. import data
    from ..transfer.library import Library
    from ..transfer.selection import select, top_references, verify

    from ..scoring import resolve_device

    data.parse_spec(args.data)
    device = resolve_device(args.device)
    library = Library.load(args.library, device=device)
    fleet = None
    if args.fleet:
        from ..fleet import Fleet

        fleet = Fleet.load(args.fleet, device=device)
    seed = data_seed(args)
    from ..data.unknown import read_unknown
    from ..transfer.features import FeatureCache, Outputs, default_cache_dir

    cache_dir = default_cache_dir(args.library) if args.feature_cache is None else (
        None if args.feature_cache == "none" else args.feature_cache)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    on_ray = args.features == "ray" or (args.features == "auto" and args.address is not None)
    formats = library.formats + ([fleet.image_format] if fleet is not None else [])
    if on_ray and len(library.formats) > 1:
        raise UsageError(f"--features ray takes a library of one image format; this one has "
                         f"{', '.join(map(str, library.formats))}: use --features here")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as session:
        x = y = None
        if fleet is not None or not on_ray:  # simex reads the images here; Ray features do not
            read: dict = {}
            images = {}
            for fmt in dict.fromkeys(formats):  # the same samples in every format a classifier (or the fleet) takes
                images[str(fmt)], y = read_unknown(args.data, split=args.split, samples=args.samples, seed=seed,
                                                   data_dir=args.data_dir, stream=False, fmt=fmt, cache=read)
            x = images if len(images) > 1 else next(iter(images.values()))
        methods = None if x is None else usable_methods(args, y)
        if on_ray and (methods is None or any(m != "simex" for m in methods)):
            from ..distributed.features import FeatureSettings, extract_outputs
            from ..distributed.runtime import ray_session

            session.enter_context(ray_session(args.address))
            outputs = extract_outputs(args.library, args.data, fmt=library.formats[0], layer=args.layer, cache=cache,
                                      settings=FeatureSettings(cpus_per_actor=args.cpus_per_actor,
                                                               block=args.batch_images),
                                      split=args.split, samples=args.samples, seed=seed, data_dir=args.data_dir,
                                      on_progress=feature_printer("on Ray"))
            y = outputs.labels if x is None else y
        else:  # lazy: only the classifiers select() asks for, and none for simex alone
            outputs = Outputs(library, x, cache=cache, layer=args.layer, on_progress=feature_printer("here"))
        methods = methods or usable_methods(args, y)
        result = select(library, x, y, methods=methods, fleet=fleet, loss=args.loss, outputs=outputs)
        out = {"library": str(args.library), "data": args.data, **result.to_json(),
               "classifiers": {n: library.classifiers[n].spec for n in library.names},
               "features": {"where": outputs.where, "cache": None if cache is None else str(cache.root),
                            "layer": outputs_layer(args.layer),
                            "fingerprint": outputs.fingerprint if outputs.report else None,
                            "actors": getattr(outputs, "actors", 0), "classifiers": dict(outputs.report)}}
        if args.verify:
            first = methods[0]
            candidates = top_references(library, result.ranking(first), args.verify)
            show = stage_printer(time.perf_counter(), [args.data])
            from ..protocol import load_protocol

            protocol = load_protocol(args.protocol) if args.protocol else None
            if args.no_ray:
                verified = verify(library, candidates, args.data, samples=args.samples, data_seed=seed,
                                  data_dir=args.data_dir, protocol=protocol, on_progress=show)
            else:
                from ..distributed.map import ray_map
                from ..distributed.runtime import ray_session

                with ray_session(args.address):  # the features' session when there is one
                    verified = verify(library, candidates, args.data, samples=args.samples, data_seed=seed,
                                      data_dir=args.data_dir, protocol=protocol, map_fn=ray_map(1.0),
                                      on_progress=show)
            helps = (out.get("no_transfer") or {}).get("transfer_helps")
            if helps is not None and "transfer_helped" in verified:  # was the no-transfer warning (or its absence) right?
                verified["no_transfer_warning_right"] = helps == verified["transfer_helped"]
            verified["method"] = first
            verified["predicted_best"] = candidates[0]
            verified["predicted_best_came"] = verified["ranking"].index(candidates[0]) + 1
            out["verified"] = verified
    out["seconds_total"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(out))
        return 0
    print(format_selection(out))
    return 0


def usable_methods(args, y) -> list[str]:
    methods = resolve_methods(args.method, labelled=y is not None, fleet=args.fleet is not None)
    if not methods:
        from ..choices import LABEL_FREE_METHODS

        free = ", ".join(m for m in LABEL_FREE_METHODS if m != "simex")
        raise UsageError("no method applies: the data has no labels and no --fleet was given; pass --fleet for "
                         f"simex, or use a label-free method ({free})")
    if args.verify and y is None:
        raise UsageError("--verify transfers the classifiers for real, which needs the data's labels")
    return methods


def feature_printer(where: str):
    """A progress line per classifier on stderr: cached, or how fast its outputs were computed."""
    def show(name: str, report: dict) -> None:
        if report["cached"]:
            print(f"features {name}: from the cache", file=sys.stderr, flush=True)
        else:
            k = report.get("pass_classifiers")
            shared = f", one pass for {k} classifiers" if k else ""
            print(f"features {name}: computed {where} in {report['seconds']:.2f}s, {report['images_per_s']:.0f} "
                  f"images/s{shared}", file=sys.stderr, flush=True)

    return show


def outputs_layer(layer: str | None) -> str:
    from ..transfer.features import layer_name

    return layer_name(layer)


def format_selection(out: dict) -> str:
    from ..names import display_names

    methods = list(out["ranking"])
    shown = display_names(out["classifiers"].values())
    names = list(out["classifiers"])
    label = {n: classifier_label(n, out["classifiers"][n], shown) for n in names}
    width = max(len(v) for v in label.values())
    first = methods[0]
    lines = [f"which classifier to transfer from, for {out['data']} ({out['n']} samples; higher = better; "
             f"ordered by {first})",
             f"{'classifier':<{width}}  " + "  ".join(f"{m:>12}" for m in methods)]
    for n in out["ranking"][first]:
        cells = [out["scores"][m].get(n) for m in methods]
        lines.append(f"{label[n]:<{width}}  " + "  ".join(f"{'-':>12}" if v is None else f"{v:>12.4g}" for v in cells))
    lines.append("needs labels: " + (", ".join(m for m in methods if out["needs_labels"][m]) or "none"))
    for m in methods:
        lines.append(f"  best by {m:<12} {label[out['ranking'][m][0]]}  ({out['seconds'][m]:.2f}s)")
    base = out.get("no_transfer") or {}
    if base.get("transfer_helps") is False:
        lines.append(f"no transfer: no classifier beats {base['features']} under {base['method']}; transfer may "
                     f"not help (a network trained from scratch may do as well)")
    if "verified" in out:
        v = out["verified"]
        lines.append(f"verified by transfer ({', '.join(v['tl_configs'])}): " + ", ".join(
            f"{label[n]} {v['accuracy'][n]:.3f}" for n in v["ranking"]))
        lines.append(f"predicted best by {v['method']} ({label[v['predicted_best']]}) came "
                     f"{v['predicted_best_came']} of {len(v['ranking'])}")
        if "no_transfer_accuracy" in v:
            lines.append(f"no transfer (the same head on the raw pixels): {v['no_transfer_accuracy']:.3f}; transfer "
                         f"{'helped' if v['transfer_helped'] else 'did not help'}")
    return "\n".join(lines)


def classifier_label(name: str, spec: str, shown: dict[str, str]) -> str:
    """A classifier as the table shows it: ``<reference>@s<seed>`` for those trained here, the name (and its
    reference, when it has another) for those added."""
    if name.startswith(f"{spec}@"):
        return f"{shown[spec]}@{name[len(spec) + 1:]}"
    return name if name == spec else f"{name} ({shown[spec]})"


def cmd_train_bases(args) -> int:
    from ..data import split_specs
    from ..protocol import DEFAULT, load_protocol, load_splits
    from ..transfer.fused_bases import plan_bases, train_base_group, train_bases
    from ..transfer.ground_truth import base_record, base_settings
    from ..transfer.library import LibraryWriter, classifier_name

    import dataclasses

    from ..fleet.plan import resolve_format

    protocol = load_protocol(args.protocol) if args.protocol else DEFAULT
    refs = split_specs(args.refs)
    seed = data_seed(args)
    fmt = resolve_format(refs, args.image_format, seed=seed, data_dir=args.data_dir)
    protocol = dataclasses.replace(protocol, image_format=str(fmt))
    print(f"image format {fmt}", file=sys.stderr)
    show = stage_printer(time.perf_counter(), refs)
    writer = LibraryWriter(args.out, extra={"refs": refs, "samples": args.samples, "data_seed": seed})
    todo = []
    for ref in refs:
        splits = load_splits(ref, samples=args.samples, data_seed=seed, data_dir=args.data_dir, protocol=protocol)
        for s in range(args.seed, args.seed + args.seeds):
            if writer.has(classifier_name(ref, s), splits.fingerprints()["clf_train"], base_settings(protocol)):
                print(f"{classifier_name(ref, s)}: already trained, skipping", file=sys.stderr)
                continue
            todo.append((ref, s, splits))
    kwargs = [dict(**sp.clf_kwargs(), optimizer=protocol.base_optimizer, lr=protocol.base_lr,
                   max_epochs=protocol.clf_max_epochs, patience=protocol.clf_patience,
                   batch_size=protocol.clf_batch_size, seed=s, n_classes=protocol.n_classes) for _, s, sp in todo]

    def keep(part, results):
        for (ref, s, sp), r in zip(part, results):
            writer.add(base_record(ref, s, r, sp, protocol, data_seed=seed, samples=args.samples), r["state"])

    t0 = time.perf_counter()
    if args.no_ray:  # one fused pass at a time, its classifiers kept as soon as it is trained
        done = 0
        for group in plan_bases(kwargs, args.members_per_pass):
            keep([todo[i] for i in group], train_base_group([kwargs[i] for i in group]))
            done += len(group)
            show("base-classifiers", done, len(todo))
    elif todo:
        from ..distributed.map import train_map
        from ..distributed.runtime import ray_session
        from ..distributed.train import Resources

        with ray_session(args.address):
            res = Resources(cpus_per_worker=args.cpus_per_task)
            step = max(1, res.concurrent_runs(len(todo)))
            groups, done = plan_bases(kwargs, args.members_per_pass, parallel=step), 0
            for start in range(0, len(groups), step):  # each round kept as it finishes: a crash loses one round
                part = groups[start:start + step]
                units = [i for g in part for i in g]
                numbered = iter(range(len(units)))
                local = [[next(numbered) for _ in g] for g in part]  # the round's groups, over its own units
                keep([todo[i] for i in units], train_bases([kwargs[i] for i in units], groups=local,
                                                           map_fn=train_map(res, on_unit=lambda fn, d, t: None)))
                done += len(units)
                show("base-classifiers", done, len(todo))
    lib = writer.classifiers
    print(f"library {args.out}: {len(lib)} classifier(s), {len(todo)} trained now in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    for c in lib.values():
        print(f"  {c.name:<32} accuracy {c.accuracy:.3f}  ({c.seconds:.1f}s)", file=sys.stderr)
    return 0


COMMANDS = {"select": cmd_select, "train-bases": cmd_train_bases}
