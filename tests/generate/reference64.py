"""The reference in float64, for the golden-parity fixtures of tests/generate/make_*_fixtures.py.

The tests run our models in float64 against the reference run in float64 on the same weights and inputs (float32
values, exact in float64): there two implementations agree to ~1e-15 of the output scale whatever the CPU and its
kernels, where float32 results move by ~1e-6..1e-5 with the summation order. A fixture stores both: the float32
outputs under their names (`output.flow`) and the float64 ones under the same name with the FLOAT64 suffix
(`output.flow.f64`); the tests read the reference's own float32 error from the pair.

diffusers computes a few things in float32 whatever the model's dtype (the sinusoidal timestep features, Flux's RoPE,
the schedulers' tables and steps). `float64(...)` swaps such functions for their own source with float32 replaced by
float64, and refuses a run in which any operation still takes or makes a float32 tensor.

`save_fixture(..., keep_float32=True)` adds the float64 outputs to a committed fixture without moving anything else:
float32 outputs differ by a few ulps from one machine to the next; weights and inputs must come out bit-identical.
"""

import contextlib
import inspect
import json
import linecache
import os
import struct
import textwrap
import traceback

import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FLOAT64 = ".f64"


def float64_source(fn):
    """fn rebuilt from its own source with torch.float32, np.float32 and .float() replaced by their float64
    counterparts, in the module it comes from (decorators included)."""
    fn = inspect.unwrap(fn)
    source = textwrap.dedent(inspect.getsource(fn))
    for old, new in (("torch.float32", "torch.float64"), ("np.float32", "np.float64"), (".float()", ".double()")):
        source = source.replace(old, new)
    filename = f"<float64 {fn.__module__}.{fn.__qualname__}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for tracebacks
    namespace = {}
    exec(compile(source, filename, "exec"), fn.__globals__, namespace)
    return namespace[fn.__name__]


class NoFloat32(TorchDispatchMode):
    """Raises at the first operation that takes or makes a float32 tensor, naming the Python line that ran it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x in tree_leaves((args, kwargs, out))):
            where = [f"{f.filename}:{f.lineno} {f.line}" for f in traceback.extract_stack()[:-1]]
            raise RuntimeError(f"float32 in the float64 run: {func} at\n  " + "\n  ".join(where[-4:]))
        return out


@contextlib.contextmanager
def float64(*targets):
    """Within the block each (owner, name) in targets (a module's function, a class's method) is its float64_source,
    new tensors default to float64, and no operation may take or make a float32 tensor."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name in targets]
    default_dtype = torch.get_default_dtype()
    try:
        for owner, name, fn in saved:
            setattr(owner, name, float64_source(fn))
        torch.set_default_dtype(torch.float64)
        with NoFloat32():
            yield
    finally:
        torch.set_default_dtype(default_dtype)
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def relative_error(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def report(tensors):
    """Print, for every float64 output, the reference's own float32 error: max abs(f32 - f64) / max abs(f64)."""
    for key in sorted(k for k in tensors if k.endswith(FLOAT64)):
        f32 = tensors.get(key[: -len(FLOAT64)])
        if f32 is not None:
            print(f"  {key[: -len(FLOAT64)]}: reference float32 vs float64 {relative_error(f32, tensors[key]):.2e}")


def _metadata(path):
    with open(path, "rb") as f:
        header = f.read(struct.unpack("<Q", f.read(8))[0])
    return json.loads(header).get("__metadata__", {})


def save_fixture(path, tensors, metadata, keep_float32=False):
    """Write the fixture. With keep_float32 and a fixture already at path, every tensor that file has stays as it is:
    the regenerated weights, inputs and metadata must equal it bit for bit (else the generator and the fixture
    disagree: refuse), the regenerated float32 outputs may differ by the machine's rounding (printed), and the
    float64 outputs are added."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if keep_float32 and os.path.exists(path):
        old = load_file(path)
        if _metadata(path) != metadata:
            raise SystemExit(f"{path}: the regenerated metadata differs from the committed one")
        for key, value in old.items():
            new = tensors.get(key)
            if new is None or new.dtype != value.dtype or new.shape != value.shape:
                raise SystemExit(f"{path}: {key} is not regenerated with the committed dtype and shape")
            if not torch.equal(new, value):
                if not key.startswith(("output.", "sample.", "schedule.")):
                    raise SystemExit(f"{path}: the regenerated {key} differs from the committed one")
                print(f"  {key}: committed value kept; regenerated here it moves by {relative_error(new, value):.2e}")
            tensors[key] = value
    save_file(tensors, path, metadata=metadata)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB")
    report(tensors)
