"""`simex library add|list`: bring your own pretrained classifiers (torchvision, timm, TorchScript) into a
classifier library that `simex select` ranks."""

from __future__ import annotations

import argparse
import json

from .common import UsageError, positive_int


def float_list(text: str) -> list[float]:
    """An argparse ``type``: comma-separated numbers, e.g. ``0.485,0.456,0.406``."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def add_parsers(sub) -> None:
    from ..choices import CLASSIFIER_ARCHITECTURES

    lib = sub.add_parser("library", help="add your own pretrained classifiers to a library, list a library",
                         description="A classifier library (LIB/library.json + content-addressed weight files) "
                                     "holds the classifiers `simex select` ranks: those `simex train-bases` "
                                     "trains, and any torchvision, timm or TorchScript classifier you add.")
    verbs = lib.add_subparsers(dest="library_command", metavar="VERB")
    verbs.required = True
    a = verbs.add_parser("add", help="add a pretrained classifier (its weight file is copied in and checked)",
                         description="Build the network from --arch and the weights, check it on two probe images, "
                                     "and keep it in the library (created when missing).")
    a.add_argument("--library", required=True, help="classifier library directory or URI")
    a.add_argument("--arch", required=True,
                   help=f"{', '.join(CLASSIFIER_ARCHITECTURES)} (torchvision and timm models are built with "
                        f"random weights, nothing is downloaded; timm needs `pip install timm`)")
    a.add_argument("--weights", required=True,
                   help="a state_dict (.pt, .pth; read with torch.load(weights_only=True)) or .safetensors file, "
                        "or the TorchScript archive for --arch torchscript; a path or URI")
    a.add_argument("--num-classes", type=positive_int, required=True,
                   help="the classes of its head (checked against the weights)")
    a.add_argument("--name", default=None, help="the classifier's name in the library (default: the file's stem)")
    a.add_argument("--image-format", default=None, metavar="CxHxW",
                   help="the images it takes (default 3x224x224; 1x28x28 for lenet5)")
    a.add_argument("--mean", type=float_list, default=None, metavar="M,M,M",
                   help="per-channel mean its inputs are normalised with, (x - mean) / std (default: ImageNet's "
                        "for torchvision and timm, none otherwise)")
    a.add_argument("--std", type=float_list, default=None, metavar="S,S,S", help="per-channel std (see --mean)")
    a.add_argument("--layer", default=None,
                   help="module whose output are its features (flattened; global-average-pooled when 4-D); "
                        "default: the input of its final Linear")
    a.add_argument("--source", default=None, metavar="SPEC",
                   help="the reference (dataset spec) it was trained on (default: it is its own reference)")
    a.add_argument("--json", action="store_true", help="print the new record as one JSON object")
    ls = verbs.add_parser("list", help="the classifiers of a library")
    ls.add_argument("--library", required=True, help="classifier library directory or URI")
    ls.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def cmd_library(args) -> int:
    return {"add": cmd_add, "list": cmd_list}[args.library_command](args)


def cmd_add(args) -> int:
    import sys

    from ..formats import FormatError, ImageFormat
    from ..transfer.library import add_classifier

    try:
        fmt = ImageFormat.parse(args.image_format) if args.image_format else None
    except FormatError as e:
        raise UsageError(f"--image-format: {e}") from None
    c = add_classifier(args.library, arch=args.arch, weights=args.weights, n_classes=args.num_classes,
                       name=args.name, image_format=fmt, mean=args.mean, std=args.std, layer=args.layer,
                       source=args.source)
    if args.json:
        print(json.dumps(c.to_json()))
    else:
        print(f"added {c.name} ({c.architecture}, {c.n_classes} classes, {c.image_format}, reference {c.spec}) "
              f"to {args.library} as {c.weights}", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    from ..transfer.library import read_library

    doc = read_library(args.library)
    if args.json:
        print(json.dumps({"library": str(args.library), "format": doc["format"], "classifiers": doc["classifiers"]}))
        return 0
    rows = [(c["name"], c.get("architecture", "lenet5"), c.get("image_format", "1x28x28"), str(c["n_classes"]),
             c["spec"], "-" if c.get("accuracy") is None or c.get("accuracy") != c.get("accuracy")
             else f"{c['accuracy']:.3f}") for c in doc["classifiers"]]
    head = ("name", "architecture", "format", "classes", "reference", "accuracy")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"library {args.library}: {len(rows)} classifier(s)")
    for r in [head, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


COMMANDS = {"library": cmd_library}
