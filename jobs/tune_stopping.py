"""Ray job entrypoint for `simex tune stopping` (same flags): the early-stopping study on Ray Tune.

    python jobs/tune_stopping.py --ground-truth runs/gt --out runs/stopping
    ray job submit --working-dir . -- python jobs/tune_stopping.py --address auto \
        --ground-truth /shared/gt --out /shared/stopping --gpus-per-trial 0.25

Re-submitting the same command resumes an interrupted study (finished trials are kept).
"""

import sys

from simex_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", "stopping", *sys.argv[1:]]))
