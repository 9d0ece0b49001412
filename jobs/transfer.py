"""Ray job entrypoint for `simex experiment transfer` (same flags): compute a ground truth once.

    python jobs/transfer.py --refs digits,rotated:digits,bgimage:digits --out runs/gt
    ray job submit --working-dir . -- python jobs/transfer.py --address auto --refs ... --out /shared/gt
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "transfer", *sys.argv[1:]]))
