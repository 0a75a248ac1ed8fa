#!/usr/bin/env python3
"""Build wheelhouse/: every wheel apollo_ds needs on a machine that already has a CUDA PyTorch
and no network, except what that machine's torch install already provides.

    python tools/wheelhouse.py --python-version 3.12 [--out wheelhouse] [--max-mib 60]
        [--torch 2.11.0] [--preinstalled numpy,...] [--glibc 2.28]

Run where PyPI is reachable (`make wheelhouse`). Steps:
  1. deepspeed as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops are JIT-built on first use
     if ever needed; apollo_ds uses none) and apollo_ds's own wheel, built here.
  2. The dependency closure of apollo_ds for the target Python and manylinux x86_64, resolved
     from wheel metadata only (`pip install --dry-run --report`; nothing large is downloaded),
     with the pinned versions of constraints.txt and torch==--torch.
  3. Left out: torch and everything its own closure brings (resolved the same way: triton,
     nvidia-*, sympy, ...), and the --preinstalled names.
  4. The rest downloaded as binary wheels (`pip download --only-binary=:all: --no-deps`).
Prints the wheelhouse's size; exits 2 when it is over --max-mib.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_args(py: str, glibc: str) -> list[str]:
    major, minor = (int(x) for x in glibc.split("."))
    plats = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    plats += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    out = ["--python-version", py, "--implementation", "cp", "--only-binary=:all:"]
    for p in plats:
        out += ["--platform", p]
    return out


def pip(*args, env=None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def resolve(reqs: list[str], plat: list[str], find_links: str, constraints: str) -> dict:
    """{normalized name: (name, version)} of the closure of ``reqs`` for the target."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        pip("install", "-q", "--dry-run", "--ignore-installed", "--report", report,
            "--target", os.path.join(tmp, "t"), "--find-links", find_links, "-c", constraints,
            *plat, *reqs)
        with open(report) as f:
            items = json.load(f)["install"]
    return {norm(i["metadata"]["name"]): (i["metadata"]["name"], i["metadata"]["version"])
            for i in items}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--out", default="wheelhouse")
    p.add_argument("--max-mib", type=float, default=60.0)
    p.add_argument("--torch", default="2.11.0",
                   help="the torch version the target has (its closure is left out)")
    p.add_argument("--preinstalled", default="",
                   help="more names (globs) the target already has, comma separated")
    p.add_argument("--glibc", default="2.28", help="newest manylinux glibc the target runs")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    constraints = os.path.join(REPO, "constraints.txt")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ds_pin = next(line.strip() for line in open(constraints) if line.startswith("deepspeed=="))
    # 1. the two wheels built here (deepspeed publishes an sdist only)
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, ds_pin,
        env={**os.environ, "DS_BUILD_OPS": "0"})
    pip("wheel", "-q", "--no-deps", "-w", out, REPO)
    # 2-3. the closure, minus torch's own
    plat = platform_args(a.python_version, a.glibc)
    torch_req = f"torch=={a.torch}"
    need = resolve(["apollo_ds", torch_req], plat, out, constraints)
    skip = set(resolve([torch_req], plat, out, constraints))
    globs = [norm(g) for g in a.preinstalled.split(",") if g.strip()]
    built = {"deepspeed", "apollo-ds"}
    fetch = sorted(f"{n}=={v}" for k, (n, v) in need.items()
                   if k not in skip and k not in built
                   and not any(fnmatch.fnmatch(k, g) for g in globs))
    left = sorted(need[k][0] for k in need if k in skip or any(fnmatch.fnmatch(k, g)
                                                               for g in globs))
    print(f"left out (preinstalled with torch {a.torch} or --preinstalled): {', '.join(left)}")
    # 4. binary wheels for the target
    pip("download", "-q", "--no-deps", "-d", out, *plat, *fetch)
    files = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    mib = size / 2 ** 20
    for f in files:
        print(f"  {os.path.getsize(os.path.join(out, f)) / 2 ** 20:7.2f} MiB  {f}")
    print(f"wheelhouse {a.out}: {len(files)} wheels, {mib:.1f} MiB (limit {a.max_mib:g} MiB) "
          f"for Python {a.python_version}")
    if mib > a.max_mib:
        print(f"error: wheelhouse {a.out} is {mib:.1f} MiB, over the {a.max_mib:g} MiB limit; "
              f"name more preinstalled packages (PREINSTALLED=...) or raise WHEELHOUSE_MAX_MIB",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
