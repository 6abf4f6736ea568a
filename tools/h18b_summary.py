"""Summary table of `tools/torch_engine_probe.py`'s rows (the JSON it writes), for the last lines
of a device log: `python3 tools/h18b_summary.py engine.json`."""

import json
import sys
from pathlib import Path


def summary(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("mode") == "build":
            if "error" in r:
                out.append(f"build FAILED: {r['error'][-800:]}")
                continue
            out.append(f"build: scope={r.get('compile_scope')} blocks_failed={r.get('blocks_failed')} "
                       f"total {r.get('build_s')} s (random modules {r.get('random_modules_s')} s, "
                       f"{r.get('timings')}), wall {r.get('wall_s')} s")
        elif str(r.get("mode", "")).startswith("fresh"):
            if "error" in r:
                out.append(f"{r['mode']}: FAILED rc={r.get('rc')}: {r['error'][-800:]}")
                continue
            out.append(f"{r['mode']} (scope {r.get('compile_scope')}): spawn -> first image {r['spawn_to_first_image_s']} s "
                       f"(imports {r['imports_s']}, from_pretrained {r['from_pretrained_s']}, first image "
                       f"{r['first_image_s']}); second image {r['second_image_s']} s; step {r['step_ms']} ms "
                       f"(bf16 inputs {r.get('step_bf16_inputs_ms')} ms); peak {r['peak_gib']} GiB")
            bd = r.get("breakdown_s", {})
            out += [f"    {k:38s} {v:8.3f}" for k, v in bd.items()]
            out.append(f"    {'sum of the parts':38s} {r.get('breakdown_sum_s', 0):8.3f}")
            out.append(f"    second image calls: {r.get('second_image_calls')}")
            out.append(f"    dynamo: {json.dumps(r.get('dynamo'))[:400]}")
        else:
            out.append(json.dumps(r)[:400])
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1])
    if not path.is_file():
        print(f"{path}: no rows (the probe wrote nothing)")
    else:
        print("\n".join(["== h18b summary =="] + summary(json.loads(path.read_text()))))
