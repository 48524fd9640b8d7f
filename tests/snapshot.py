"""Small stored reference values for the classroom exercises (tests/snapshots/<exercise id>.json).

They are made from the solution on a tiny seeded input and kept small enough to read (6 significant
digits; integers such as block ids or parameter counts stay exact), so a graded test compares with
numbers, never with a second copy of the solution. `NANO_UPDATE_SNAPSHOTS=1 python -m pytest -q`
rewrites them from the code under test: run it on the repository, never on a student's copy."""
import json
import os

import numpy as np
import torch

SNAPSHOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots")


def snapshot(ex_id, name, value, rtol=1e-5, atol=1e-9):
    """Compare `value` with the entry `name` of tests/snapshots/<ex_id>.json (or write it)."""
    path = os.path.join(SNAPSHOTS, ex_id + ".json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    value = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value)
    is_int = value.dtype.kind in "iub"
    value = value.astype(np.int64 if is_int else np.float64)
    if os.environ.get("NANO_UPDATE_SNAPSHOTS") == "1":
        data["_made_by"] = ("the tests of this exercise, from the solution; regenerate with "
                            "NANO_UPDATE_SNAPSHOTS=1 python -m pytest -q")
        rounded = np.vectorize(lambda v: float(f"{v:.6g}"))(value) if value.size else value
        data[name] = value.tolist() if is_int else np.asarray(rounded).tolist()
        os.makedirs(SNAPSHOTS, exist_ok=True)
        with open(path, "w") as f:
            f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}"
                                        for k, v in sorted(data.items())) + "\n}\n")
        return
    assert name in data, f"{path} has no entry {name!r} (NANO_UPDATE_SNAPSHOTS=1 makes it)"
    want = np.asarray(data[name])
    msg = f"snapshot {ex_id}/{name}"
    if is_int:
        np.testing.assert_array_equal(value, want, err_msg=msg)
    else:
        np.testing.assert_allclose(value, want.astype(np.float64), rtol=rtol, atol=atol, err_msg=msg)
