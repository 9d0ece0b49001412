"""Ray job entrypoint for `simex experiment latency` (same flags).

    python jobs/latency.py --refs digits,rotated:digits,bgimage:digits,bgrand:digits --out runs/latency
    ray job submit --working-dir . -- python jobs/latency.py --address auto --refs ... --out /shared/latency
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "latency", *sys.argv[1:]]))
