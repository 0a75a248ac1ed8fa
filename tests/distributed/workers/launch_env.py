"""Prints what a launched rank sees (its launcher environment, __name__, argv, cwd, the fault
items apollo_ds read from APOLLO_DS_FAULT) as one JSON line; with --fail, rank 1 exits 3 and
the other ranks wait to be stopped."""
import json
import os
import sys
import time

from apollo_ds.training import faults

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT")
print(json.dumps({"name": __name__, "argv": sys.argv[1:], "cwd": os.getcwd(),
                  "faults": faults._ITEMS, **{k: os.environ.get(k) for k in KEYS}}), flush=True)
if "--fail" in sys.argv:
    if os.environ["RANK"] == "1":
        sys.exit(3)
    time.sleep(120)
