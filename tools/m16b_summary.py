"""Merges the memory bench's JSON files into one and prints the issue-16 table (tools/m16b_gpu.sh):
python3 tools/m16b_summary.py OUT.json IN_memory.json ..."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {("sd3.5-large", True): 9.5, ("sd3.5-medium", True): 5.0, ("sd3.5-medium", False): 3.5}  # GiB, low


def main(out: str, *files: str) -> None:
    rows = [r for f in files if Path(f).is_file() for r in json.loads(Path(f).read_text())]
    Path(out).write_text(json.dumps(rows, indent=1))
    print(f"{'preset':14} {'t5':3} {'mode':8} {'peak GiB':>9} {'reserved':>9} {'first s':>8}  target")
    for r in rows:
        target = TARGETS.get((r["preset"], r["t5"])) if r["memory"] == "low" else None
        verdict = "" if target is None else f"<= {target}: {'MET' if r['peak_gib'] <= target else 'MISSED'}"
        print(f"{r['preset']:14} {'yes' if r['t5'] else 'no':3} {r['memory']:8} {r['peak_gib']:9.3f} "
              f"{r['peak_reserved_gib']:9.3f} {r['first_s']:8.2f}  {verdict}")
        for stage, b in r.get("stages", {}).items():
            print(f"    {stage:12} weights {b['weights_gib']:6.3f}  peak {b['peak_gib']:6.3f}  "
                  f"other {b['other_gib']:6.3f}  reserved {b['reserved_gib']:6.3f}")
    if not rows:
        print("no bench rows came back")


if __name__ == "__main__":
    main(*sys.argv[1:])
