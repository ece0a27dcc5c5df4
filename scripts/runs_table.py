"""A markdown table of finished runs' paired evaluations: gain +- standard error per evaluation.

What: for each run folder given, the change from the base model (same noise) on each evaluation
group at each evaluated epoch (`eval_<group>_gain` +- `eval_<group>_gain_se` in metrics.jsonl),
the summed training seconds and the peak resident memory. Why: comparing algorithms at equal
samples from the runs themselves. The runs are ordinary CLI runs, e.g. (session 7's comparison):

    for alg in "ddpo-is" nft awm; do
      OMP_NUM_THREADS=2 ddpo-lite train --preset shapes-alignment --output /tmp/ex_$alg --quiet \\
        --set num_epochs=12 --set eval.every=3 --set log_with=[] --set train.algorithm=$alg \\
        --set train.learning_rate=3e-3 --set train.first_steps=0
    done
    python scripts/runs_table.py /tmp/ex_*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(folder: Path) -> str:
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m for m in metrics if "eval_reward_mean" in m]
    groups = [k[5:-5] for k in evaluated[0] if k.startswith("eval_") and k.endswith("_gain")]
    groups.sort(key=lambda g: (g != "train", g))  # the training captions first
    cells = []
    for group in groups:
        gains = ", ".join(
            f"{m['epoch']}: {m[f'eval_{group}_gain']:+.3f} ± {m[f'eval_{group}_gain_se']:.3f}"
            for m in evaluated
        )
        cells.append(gains)
    seconds = sum(m["epoch_seconds"] for m in metrics)
    peak = max(m["peak_memory_bytes"] for m in metrics) / 2**30
    return f"| {folder.name} | " + " | ".join(cells) + f" | {seconds:.0f} | {peak:.2f} |"


def main() -> None:
    folders = [Path(p) for p in sys.argv[1:]]
    print(
        "| run | training captions (epoch: gain ± s.e.) | held-out captions | training s "
        "| peak RSS GiB |"
    )
    print("| --- | --- | --- | --- | --- |")
    for folder in folders:
        print(row(folder))


if __name__ == "__main__":
    main()
