"""Ray job entrypoint for `simex experiment inter-dataset` (same flags).

    python jobs/inter_dataset.py --refs digits,rotated:digits,bgimage:digits,bgrand:digits --out runs/inter-dataset
    ray job submit --working-dir . -- python jobs/inter_dataset.py --address auto --refs ... --out /shared/inter-dataset
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "inter-dataset", *sys.argv[1:]]))
