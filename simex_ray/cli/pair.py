"""`simex pair`: pair each class of labelled unknown data with a class of a per-class reference fleet."""

from __future__ import annotations

import json
import time

from .common import UsageError, add_device_arg, add_loss_arg


def add_parsers(sub) -> None:
    from ..choices import PAIRING_METHODS as METHODS

    p = sub.add_parser(
        "pair", help="pair the classes of labelled unknown data with a reference's classes (greedy, smallest Δ first)",
        description="For each class c_i of the unknown data X and each class c_k of the reference Y of a per-class "
                    "fleet, compute a distance D[i, k] (simex: Δ(c_i | A(c_k)); sample-mse: pixel-space MSE between "
                    "samples; embeddings: distance in the bottleneck of A(Y)) and fix pairs greedily, smallest D "
                    "first, each class used once.")
    p.add_argument("--fleet", required=True, help="a per-class fleet (`simex train --per-class`)")
    p.add_argument("--data", required=True, help="labelled unknown data (a dataset spec)")
    p.add_argument("--method", choices=METHODS, default="simex", help="class distance (default simex)")
    p.add_argument("--ref", default=None, help="which reference of the fleet, when it holds several per-class ones")
    p.add_argument("--ae", default=None, metavar="FLEET",
                   help="fleet holding the whole-dataset autoencoder A(Y), for --method embeddings "
                        "(`simex train --refs Y --out FLEET`)")
    add_loss_arg(p, help="override the fleet's Δ (simex only)")
    p.add_argument("--samples", type=int, default=None,
                   help="at most this many unknown samples per class (seeded; default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of sample-space pairs (default 0)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_device_arg(p, help="where the autoencoders run (default cpu)")


def cmd_pair(args) -> int:
    from .. import data
    from ..fleet import Fleet, read_manifest
    from ..pairing import pair, per_class_reference, reference_class_samples, unknown_classes, \
        whole_dataset_autoencoder
    from ..scoring import resolve_device

    data.parse_spec(args.data)
    if args.method == "embeddings" and not args.ae:
        raise UsageError("--method embeddings needs --ae FLEET, a fleet with the whole-dataset autoencoder A(Y)")
    if args.method != "simex" and args.loss:
        raise UsageError(f"--loss applies to --method simex only, not {args.method}")
    device = resolve_device(args.device)
    fleet = Fleet.load(args.fleet, device=device)
    ref, names, _ = per_class_reference(fleet.members, args.ref)
    t0 = time.perf_counter()
    cache: dict = {}
    xs, classes = unknown_classes(data.load(args.data, seed=args.seed, data_dir=args.data_dir, cache=cache),
                                  args.samples, args.seed)
    reference_samples = autoencoder = None
    if args.method != "simex":
        manifest = read_manifest(args.fleet)
        reference_samples = reference_class_samples(fleet.members, names, samples=manifest.get("samples"),
                                                    data_seed=manifest.get("data_seed"), data_dir=args.data_dir,
                                                    cache=cache)
    if args.method == "embeddings":
        autoencoder = whole_dataset_autoencoder(args.ae, ref, device)
    result = pair(fleet, xs, classes, method=args.method, reference=ref, loss=args.loss, autoencoder=autoencoder,
                  reference_samples=reference_samples, seed=args.seed)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"fleet": str(args.fleet), "data": args.data, **result.to_json(), "seconds": seconds}))
        return 0
    print(format_pairing(result, f"{args.method} pairing of {args.data} with {ref} ({seconds:.2f}s)"))
    return 0


def format_pairing(result, title: str) -> str:
    """The class matrix ('*' = fixed pair) and the pairs in the order they were fixed."""
    import numpy as np

    pairs = result.pairs
    paired = {(i, k) for i, k, _ in pairs}
    corner = "X \\ Y"
    w0 = max(len(c) for c in [*result.unknown_classes, corner])
    w = max(9, *(len(c) + 1 for c in result.reference_classes))
    lines = [title, f"{corner:<{w0}}  " + "  ".join(f"{c:>{w}}" for c in result.reference_classes)]
    for i, row in enumerate(np.asarray(result.matrix)):
        cells = [f"{v:.4g}{'*' if (i, k) in paired else ' '}" for k, v in enumerate(row)]
        lines.append(f"{result.unknown_classes[i]:<{w0}}  " + "  ".join(f"{c:>{w}}" for c in cells))
    lines.append("pairs, in the order fixed (smallest distance first):")
    for n, (i, k, v) in enumerate(pairs, 1):
        lines.append(f"  {n:>2}. {result.unknown_classes[i]} -> {result.reference_classes[k]}  ({v:.5g})")
    return "\n".join(lines)


COMMANDS = {"pair": cmd_pair}
