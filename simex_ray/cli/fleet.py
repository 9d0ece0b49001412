"""`simex train`, `simex score`, `simex matrix`: build a fleet and score unknown data against it."""

from __future__ import annotations

import json
import logging
import sys
import time

from .common import (UsageError, add_address_arg, add_data_args, add_device_arg, add_loss_arg,
                     add_strict_format_arg, data_seed,
                     epoch_printer, format_score, positive_float, positive_int, spec_help,
                     split_members)

log = logging.getLogger("simex")

def add_train_args(p) -> None:
    """Training and cluster flags, shared by `simex train` and the jobs."""
    from ..choices import (ARCHITECTURES, AUTO_MAX_EPOCHS, AUTO_MIN_GAIN, AUTO_PATIENCE, DEFAULT_PRECISION, OPTIMIZERS,
                           PRECISIONS, STREAM_BYTES, STREAM_MODES, TRAIN_DEFAULTS)

    add_loss_arg(p, help=f"reconstruction error delta (default {TRAIN_DEFAULTS['loss']})")
    p.add_argument("--epochs", type=epochs_arg, default=None, metavar="N|auto",
                   help=f"training epochs (default {TRAIN_DEFAULTS['epochs']}); auto: until the member's own held-out delta stops improving "
                        f"({AUTO_PATIENCE} epochs without a {AUTO_MIN_GAIN:.0%} gain, at most {AUTO_MAX_EPOCHS})".replace("%", "%%"))
    p.add_argument("--per-class", action="store_true", help="one member per class of each reference")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None,
                   help=f"(default {TRAIN_DEFAULTS['optimizer']})")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the optimizer's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"(default {TRAIN_DEFAULTS['batch_size']})")
    p.add_argument("--architecture", "--arch", choices=sorted(ARCHITECTURES), default=None,
                   help="autoencoder (default: lenet, the paper's, at 1x28x28; conv at any other format)")
    p.add_argument("--image-format", default="auto", metavar="auto|CxHxW",
                   help="the fleet's image format, e.g. 3x32x32 (default auto: the references' common native "
                        "format); data in another format is converted by the rule (docs/specs.md)")
    add_strict_format_arg(p)
    p.add_argument("--from-study", default=None, metavar="STOPPING_JSON",
                   help="take optimizer, lr, epochs, loss, batch size and architecture from the best configuration "
                        "of `simex tune stopping` (its stopping.json or directory); flags given explicitly win")
    add_data_args(p)
    add_address_arg(p)
    p.add_argument("--storage", default=None, help="checkpoint storage path or URI (default OUT/checkpoints)")
    p.add_argument("--runs", type=positive_int, default=None,
                   help="concurrent Ray Train runs; members are dealt among them (default: cluster CPUs / "
                        "--cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0, help="CPUs per Train worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs (fractions allowed) per Train worker (default 0)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed Train worker (default 2)")
    p.add_argument("--members-per-pass", type=positive_int, default=None,
                   help="members alike (architecture, format, loss, optimizer, lr, batch size) trained together in "
                        "one fused forward and backward pass (default: as many as the pass's memory bound allows; "
                        "1: one member after another); the results equal separate training to float tolerance")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="forward passes in fp32, or under bfloat16 autocast (bf16: for GPUs; weights and optimizer "
                        f"stay fp32, δ is fp32) (default {DEFAULT_PRECISION})")
    p.add_argument("--workers-per-member", type=positive_int, default=1,
                   help="Train workers per member: > 1 trains each member data-parallel (DDP), each step's batch "
                        "split evenly among its workers, so the steps are one worker's (default 1)")
    p.add_argument("--stream", choices=STREAM_MODES, default="auto",
                   help="read a whole parquet: or uncompressed npz: reference slice by slice where it trains, never "
                        f"on the driver (default auto: when its images take more than {STREAM_BYTES >> 20} MiB; "
                        "always; never)")
    p.add_argument("--no-ray", action="store_true", help="train in this process (no Ray)")


def add_parsers(sub) -> None:
    from ..choices import DEFAULT_RANKING, LATENT_RANKING, PRECISIONS, RANKINGS

    t = sub.add_parser("train", help="train one autoencoder per reference (Ray Train)",
                       description="Train one autoencoder per reference part on Ray Train. "
                                   "Re-running the same command resumes.")
    t.add_argument("--refs", required=True, help="comma-separated reference specs; " + spec_help())
    t.add_argument("--out", required=True, help="fleet directory (created; re-use to resume)")
    add_train_args(t)

    s = sub.add_parser("score", help="rank the fleet's references by delta of unknown data",
                       description="Delta(X|Y) of unknown data X against every member Y; smaller = more similar.")
    s.add_argument("--fleet", required=True, help="fleet directory written by `simex train`")
    s.add_argument("--data", required=True, help=spec_help())
    s.add_argument("--split", choices=("all", "train", "test"), default="all",
                   help="score all samples, or the train/test part of the same 5:1 split `simex train` uses")
    s.add_argument("--members", default=None, help="comma-separated subset of members (default all)")
    add_loss_arg(s, help="override the fleet's delta")
    add_strict_format_arg(s)
    s.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    s.add_argument("--ranking", choices=RANKINGS, default=None,
                   help=f"how `ranking` orders references (default: {LATENT_RANKING} when every member has latent "
                        f"moments, else {DEFAULT_RANKING}); every ranking is in --json")
    s.add_argument("--show", default=None, metavar="OUT.png",
                   help="draw 8 sampled inputs and their reconstructions through the top 3 references, with δ")
    s.add_argument("--per-sample", default=None, metavar="OUT.parquet",
                   help="write one row per sample: index, label, δ per member, nearest member, its score")
    add_device_arg(s)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the autoencoders' forward passes in fp32, or under bfloat16 autocast (δ is fp32) (fp32)")
    add_data_args(s)
    add_batch_args(s)

    m = sub.add_parser("matrix", help="delta of several unknown datasets against every member (+ heatmap)",
                       description="Rows: unknown datasets (held-out test split by default); "
                                   "columns: the fleet's references. Writes JSON, Parquet and a PNG heatmap.")
    m.add_argument("--fleet", required=True, help="fleet directory written by `simex train`")
    m.add_argument("--data", default=None, help="comma-separated specs (default: the fleet's own references)")
    m.add_argument("--split", choices=("all", "train", "test"), default="test",
                   help="which part of the 5:1 split to score (default test: samples no member trained on)")
    add_loss_arg(m, help="override the fleet's delta")
    add_strict_format_arg(m)
    m.add_argument("--out", default=None,
                   help="write delta_matrix.{json,parquet,png} here, and reconstructions/<unknown>.png for each unknown")
    m.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_device_arg(m)
    add_data_args(m)
    add_batch_args(m)


def add_batch_args(p) -> None:
    """--address and the Ray Data batch-scoring flags of `simex score` and `simex matrix`."""
    p.add_argument("--address", default=None,
                   help="score on this Ray cluster with Ray Data (auto, ray://host:10001, or local for an "
                        "embedded one); without it the data is scored in this process")
    p.add_argument("--actors", type=positive_int, default=None,
                   help="with --address: scorer actors per shard (default: cluster CPUs / shards / --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=positive_float, default=1.0, help="with --address: CPUs per scorer (1)")
    p.add_argument("--members-per-shard", type=positive_int, default=None,
                   help="with --address: members per scorer actor; a larger fleet is split into shards (default: all)")
    p.add_argument("--batch-images", type=positive_int, default=2048,
                   help="with --address: images per scoring batch (2048)")


def batch_settings(args):
    from ..distributed.batch import BatchSettings

    return BatchSettings(actors=args.actors, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_images,
                         members_per_shard=args.members_per_shard)


def epochs_arg(text: str):
    """``--epochs``: a positive number, or ``auto``."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def train_config(args, image_format=None):
    """The TrainConfig of `simex train` and the jobs: flags, else --from-study, else the defaults.

    ``image_format``: the fleet's resolved format (default: the legacy 1x28x28); the architecture
    defaults to the one for that format."""
    from pathlib import Path

    from ..training import TrainConfig

    study = {}
    if getattr(args, "from_study", None):
        from ..experiments.stopping import recommended_training

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
    from ..choices import TRAIN_DEFAULTS

    kw = {}
    for key, default in {**TRAIN_DEFAULTS, "architecture": None}.items():  # None: the format's default
        given = getattr(args, key)
        kw[key] = given if given is not None else study.get(key) if study.get(key) is not None else default
    from ..formats import LEGACY
    from ..models import default_architecture

    fmt = image_format or LEGACY
    kw["architecture"] = kw["architecture"] or default_architecture(fmt)
    make = TrainConfig.auto if kw["epochs"] == "auto" else TrainConfig  # auto sets epochs (the cap) and patience
    return make(seed=args.seed, image_format=str(fmt), precision=getattr(args, "precision", "fp32"), **kw)


def resources_from(args):
    from ..distributed.train import Resources

    return Resources(cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                     runs=args.runs, max_failures=args.max_failures, members_per_pass=args.members_per_pass,
                     workers_per_member=args.workers_per_member)


def build_from(args, out=None):
    """Train the fleet of `simex train` / jobs/main.py into ``out`` (default --out): on Ray Train, or here
    with --no-ray (no Ray imported)."""
    from ..data import parse_spec, split_specs

    refs = split_specs(args.refs)
    for spec in refs:  # a bad spec fails before any data is read, or torch imported
        parse_spec(spec)
    from ..fleet.plan import conversions, resolve_format

    out = args.out if out is None else out
    cache: dict = {}
    requested = getattr(args, "image_format", "auto")
    fmt = resolve_format(refs, requested, seed=data_seed(args), data_dir=args.data_dir, cache=cache)
    config = train_config(args, fmt)
    converted = conversions(refs, fmt, seed=data_seed(args), data_dir=args.data_dir, cache=cache)
    how = "the references' native format" if str(requested).strip().lower() == "auto" else "--image-format"
    print(f"image format {fmt} ({how}), architecture {config.architecture}", file=sys.stderr)
    if converted and getattr(args, "strict_format", False):
        raise UsageError(f"--strict-format: {'; '.join(f'{k}: {v}' for k, v in converted.items())}")
    for spec, step in converted.items():
        print(f"  converting {spec}: {step}", file=sys.stderr)
    on_epoch = epoch_printer(time.perf_counter(), refs)
    common = dict(samples=args.samples, per_class=args.per_class, seed=data_seed(args), data_dir=args.data_dir,
                  cache=cache, stream=getattr(args, "stream", "auto"))
    if args.no_ray:
        from ..fleet.build import build_fleet_local

        return build_fleet_local(refs, out, config, on_epoch=on_epoch, members_per_pass=args.members_per_pass,
                                 **common)
    from ..distributed.train import build_fleet

    return build_fleet(refs, out, config, address=args.address, resources=resources_from(args),
                       storage=args.storage, on_progress=on_epoch, log_to_driver=getattr(args, "debug", False),
                       **common)


def cmd_train(args) -> int:
    from ..names import display_names

    t0 = time.perf_counter()
    plans, writer = build_from(args)
    print(f"fleet {args.out}: {len(writer.members)} member(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    shown = display_names(p.name for p in plans)
    width = max(len(v) for v in shown.values())
    for name in (p.name for p in plans):
        m = writer.members[name]
        print(f"  {shown[name]:<{width}} train Δ {m.metrics.get('train_delta', float('nan')):.5f}  "
              f"test Δ {m.metrics.get('test_delta', float('nan')):.5f}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from .. import data

    data.parse_spec(args.data)  # a bad spec or fleet fails before any data is read (a bad spec: or torch imported)
    if args.address:
        return score_on_ray(args)
    from ..data.unknown import conversion_note, read_unknown
    from ..fleet import Fleet, atomic_write_bytes
    from ..scoring import keep_freed_memory, resolve_device

    keep_freed_memory()  # this process scores: freed chunk buffers are reused (docs/results.md, "Memory")

    fleet = Fleet.load(args.fleet, names=split_members(args.members), device=resolve_device(args.device))
    fleet.precision = args.precision
    fmt, cache = fleet.image_format, {}
    images, labels = read_unknown(args.data, split=args.split, samples=args.samples, seed=data_seed(args),
                                  data_dir=args.data_dir, fmt=fmt, strict=args.strict_format, cache=cache)
    converted = conversion_note(args.data, fmt, seed=data_seed(args), data_dir=args.data_dir, cache=cache)
    t0 = time.perf_counter()
    result = fleet.score(images, loss=args.loss, method=args.ranking,
                         per_sample=args.per_sample is not None)
    elapsed = time.perf_counter() - t0
    if args.per_sample:
        import io

        buf = io.BytesIO()
        result.per_sample_table(list(result.delta), labels).to_parquet(buf, index=False)
        atomic_write_bytes(args.per_sample, buf.getvalue())  # a local path or a URI
    if args.show:
        from ..fleet.show import show_reconstructions

        if not hasattr(images, "__len__"):  # a stream, used up by scoring: read it again
            images = read_unknown(args.data, split=args.split, samples=args.samples, seed=data_seed(args),
                                  data_dir=args.data_dir, fmt=fmt, strict=args.strict_format)[0]
        path = show_reconstructions(fleet, images, result, args.show, title=args.data)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({"fleet": str(args.fleet), "data": args.data, "image_format": str(fmt),
                          "conversion": converted, **result.to_json(), "seconds": elapsed}))
        return 0
    if converted:
        print(f"converted {args.data}: {converted}", file=sys.stderr)
    print(format_score(result, f"Δ({args.data} | Y) over {result.n} samples, loss {result.loss}, "
                               f"fleet {args.fleet} ({elapsed:.2f}s)"))
    return 0


def score_on_ray(args) -> int:
    """`simex score --address`: Ray Data batch scoring, the same answer and output as in this process."""
    from ..distributed.batch import score_batch
    from ..distributed.runtime import ray_session

    if args.show:
        raise UsageError("--show draws in this process; drop --address to use it")
    with ray_session(None if args.address == "local" else args.address):
        out = score_batch(args.fleet, args.data, strict=args.strict_format, loss=args.loss,
                          method=args.ranking, members=split_members(args.members),
                          per_sample=args.per_sample, settings=batch_settings(args), device=args.device,
                          split=args.split, samples=args.samples, seed=data_seed(args), data_dir=args.data_dir)
    result, elapsed = out["result"], out["seconds"]
    how = {k: out[k] for k in ("slices", "shards", "actors")}
    if args.json:
        print(json.dumps({"fleet": str(args.fleet), "data": args.data, "conversion": out["conversion"],
                          **result.to_json(), "seconds": elapsed, "ray_data": how}))
        return 0
    if out["conversion"]:
        print(f"converted {args.data}: {out['conversion']}", file=sys.stderr)
    if out["per_sample"]:
        print(f"wrote per-sample rows to {out['per_sample']} (a Parquet dataset)", file=sys.stderr)
    print(format_score(result, f"Δ({args.data} | Y) over {result.n} samples, loss {result.loss}, fleet {args.fleet} "
                               f"(Ray Data: {how['slices']} slices, {how['shards']} shard(s) x {how['actors']} "
                               f"actor(s), {elapsed:.2f}s)"))
    return 0


def cmd_matrix(args) -> int:
    from ..data import split_specs
    from ..experiments.matrix import delta_matrix, format_matrix, write_matrix
    from ..fleet import Fleet, read_manifest
    from ..scoring import keep_freed_memory, resolve_device

    keep_freed_memory()  # this process scores: freed chunk buffers are reused (docs/results.md, "Memory")

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
    def draw(spec, x, res):  # the reconstruction grid of each unknown, beside the matrix
        from pathlib import Path

        from ..fleet.show import show_path, show_reconstructions

        show_reconstructions(fleet, x, res, show_path(Path(args.out) / "reconstructions", spec), title=spec)

    common = dict(samples=args.samples, seed=data_seed(args), split=args.split, data_dir=args.data_dir)
    if args.address:  # Ray Data: each unknown scored on the cluster; no images come back to draw
        from ..distributed.batch import score_batch
        from ..distributed.runtime import ray_session

        def on_ray(spec):
            out = score_batch(args.fleet, spec, strict=args.strict_format, loss=args.loss,
                              settings=batch_settings(args), device=args.device, **common)
            return out["result"], out["conversion"]

        with ray_session(None if args.address == "local" else args.address):
            result = delta_matrix(fleet, unknown, loss=args.loss, strict=args.strict_format, score_spec=on_ray,
                                  **common)
    else:
        result = delta_matrix(fleet, unknown, loss=args.loss, strict=args.strict_format,
                              on_scored=draw if args.out else None, **common)
    result["fleet"] = str(args.fleet)
    if args.out:
        paths = write_matrix(result, args.out)
        grids = "" if args.address else f" and {args.out}/reconstructions/*.png"
        print("wrote " + ", ".join(str(p) for p in paths.values()) + grids, file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"Δ(X | Y), loss {result['loss']}, {result['split']} split ('*' = most similar reference)")
        print(format_matrix(result))
    return 0


COMMANDS = {"train": cmd_train, "score": cmd_score, "matrix": cmd_matrix}
