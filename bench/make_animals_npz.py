"""Write the animal-mnist wheel's 10,000 28x28 silhouettes (10 classes) as an npz: spec file.

    pip install --no-deps animal-mnist==0.4
    python bench/make_animals_npz.py runs/data/animals.npz

A non-digit domain for the offline suite: digit variants alone cannot show
whether a similarity measure tells domains apart.
"""

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np


def main(out: str) -> None:
    try:
        import animal_mnist
    except ImportError:
        sys.exit("animal-mnist is not installed: pip install --no-deps animal-mnist==0.4")
    root = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    # Trusted: arrays shipped inside a pinned wheel (never a user's file).
    with gzip.open(root / "animal_data_version_3.gz") as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(root / "animal_label_version_3.gz") as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=x, y=y)
    print(f"wrote {out}: x {x.shape} {x.dtype}, {len(np.unique(y))} classes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/data/animals.npz")
