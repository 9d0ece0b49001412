"""Data sources: one module per source family, each registering itself with :mod:`simex_ray.data.spec`.

Adding a source is one new module here that calls
:func:`~simex_ray.data.spec.register_file` (a file scheme ``name:PATH`` or
``name:DIR``) or :func:`~simex_ray.data.spec.register_builtin` (a named
dataset) at import, plus its line below. The import order is the order in
which help texts and error messages list them.
"""

from . import npz, pkl, idx, folder, parquet  # noqa: F401  (file schemes, in listing order)
from . import builtin  # noqa: F401  (built-in datasets)
from . import cifar, svhn, stl10, photos  # noqa: F401  (colour built-ins)
