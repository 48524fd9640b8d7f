"""results.json of a nano_prune run -> results.csv, one row per number: key (the JSON path, joined
by '/'), value, and the run's device, torch, commit, seed, preset. Usage, from the repo root:
    python assets/prune_gpu_h200/flatten.py assets/prune_gpu_h200"""
import csv, json, os, sys

run = sys.argv[1]
res = json.load(open(os.path.join(run, "results.json")))
cfg = json.load(open(os.path.join(run, "config.json")))
info = dict(device=cfg["device_name"], torch=cfg["torch"], commit=cfg["git_commit"],
            seed=cfg["config"]["seed"], preset=cfg["config"]["preset"])
rows = []


def walk(key, v):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(f"{key}/{k}" if key else str(k), x)
    elif isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
        for i, x in enumerate(v):
            walk(f"{key}/{i}", x)
    elif key not in ("config",) and not key.startswith("config/"):
        rows.append(dict(key=key, value=json.dumps(v) if isinstance(v, list) else v, **info))


walk("", res)
with open(os.path.join(run, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["key", "value", *info]); w.writeheader(); w.writerows(rows)
print(len(rows), "rows")
