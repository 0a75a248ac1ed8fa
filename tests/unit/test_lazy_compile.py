"""apollo_ds.lazy_compile: megatron-core and DeepSpeed imported without TorchInductor (a fresh
interpreter), torch.compile restored afterwards, and the deferral compiling a function exactly
once, on its first call, with the options it was given; modules are compiled at once."""
import subprocess
import sys

import torch

from apollo_ds import lazy_compile
from tests.conftest import REPO

PROBE = """
import sys, torch
real = torch.compile
from apollo_ds.lazy_compile import import_heavy
import_heavy()
import megatron.core.jit
print(torch.compile is real, 'torch._inductor.compile_fx' in sys.modules,
      megatron.core.jit.jit_fuser.__name__)
"""


def test_heavy_imports_skip_inductor_and_restore_torch_compile():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    # (without the deferral megatron-core's import alone loads compile_fx); its jit_fuser is
    # the deferring torch.compile
    assert r.stdout.split()[-3:] == ["True", "False", "compile_later"], r.stdout


def test_a_function_compiles_once_on_first_call_with_its_options():
    calls = []

    def real(model=None, **options):
        calls.append((model, options))
        return lambda *a: ("compiled", model(*a))

    defer = lazy_compile._deferring(real)

    def inc(x):
        return x + 1
    f = defer(inc, mode="max-autotune")
    g = defer(fullgraph=True)(inc)             # the decorator form, @torch.compile(...)
    assert calls == [] and f.__name__ == "inc" and f.__wrapped__ is inc
    assert f(1) == ("compiled", 2) and f(5) == ("compiled", 6)
    assert calls == [(inc, {"mode": "max-autotune"})]
    assert g(2) == ("compiled", 3) and calls[1] == (inc, {"fullgraph": True})
    m = torch.nn.Linear(2, 2)
    defer(m, dynamic=False)                    # a module (train.compile): compiled at once
    assert calls[2] == (m, {"dynamic": False}) and len(calls) == 3
