"""Run a reference implementation in float64 throughout, for the float64 expected outputs of golden-parity fixtures.

A reference cast to float64 (`model.double()`, inputs `.double()`) still rounds to float32 wherever its code names
float32: `.float()` before a norm or a residual add, `dtype=torch.float32` in the time embedding and the position
tables, `.to(torch.float32)` around RoPE. Those casts are there for half precision; in a float64 run they would put
float32 roundings (about 1e-7 of the output) into the expected outputs, and a float64 comparison would measure them
rather than the model. Inside `float32_is_float64()` float32 means float64: `.float()` gives float64, float32 given
as a dtype (to `.to`, to tensor factories, to `torch.linalg.vector_norm`) is float64, and so is the default dtype.

`keep_committed` keeps a fixture's committed expected outputs where a rerun only moves them by rounding: float32
outputs recomputed on another machine (or thread count) differ in the last bits, and churning them would say nothing.

Used by the generators (tests/generate/make_*_fixtures.py, run as scripts from this folder); the tests never import it.
"""

import contextlib
import os

import torch
from safetensors import safe_open

# Tensor factories and reductions that take a dtype= a reference may hard-code to float32.
FUNCTIONS = (
    (torch, ("arange", "linspace", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "randn", "rand")),
    (torch.linalg, ("vector_norm", "norm")),
)


def _f64(dtype):
    return torch.float64 if dtype == torch.float32 else dtype


@contextlib.contextmanager
def float32_is_float64():
    saved = []

    def patch(owner, name, make):
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def with_dtype(original):
        def call(*args, **kwargs):
            if "dtype" in kwargs:
                kwargs["dtype"] = _f64(kwargs["dtype"])
            return original(*args, **kwargs)

        return call

    def to(original):
        def call(self, *args, **kwargs):
            args = tuple(_f64(a) if isinstance(a, torch.dtype) else a for a in args)
            if "dtype" in kwargs:
                kwargs["dtype"] = _f64(kwargs["dtype"])
            return original(self, *args, **kwargs)

        return call

    default = torch.get_default_dtype()
    try:
        for owner, names in FUNCTIONS:
            for name in names:
                patch(owner, name, with_dtype)
        patch(torch.Tensor, "to", to)
        patch(torch.Tensor, "float", lambda original: lambda self, *args, **kwargs: self.double(*args, **kwargs))
        torch.set_default_dtype(torch.float64)
        yield
    finally:
        torch.set_default_dtype(default)
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


# How far a recomputed output may move and still be the same result: kernel choice, in units of the output scale.
REPRODUCED = {torch.float32: 1e-5, torch.float64: 1e-12}


def keep_committed(path, tensors):
    """The tensors to write to the fixture at `path`: `tensors`, except that where the committed fixture has the same
    weights and inputs (bit for bit), each committed output (key `output.*`) that the rerun reproduces to rounding
    (REPRODUCED) is kept as it was. Prints how far the rerun moved each output."""
    if not os.path.exists(path):
        return tensors
    with safe_open(path, framework="pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
    same_inputs = all(
        k in tensors and old[k].dtype == tensors[k].dtype and torch.equal(old[k], tensors[k])
        for k in old
        if not k.startswith("output.")
    )
    if not same_inputs:
        print(f"{path}: weights or inputs changed; every output recomputed")
        return tensors
    kept = dict(tensors)
    for k, new in tensors.items():
        if k.startswith("output.") and k in old and old[k].dtype == new.dtype and old[k].shape == new.shape:
            if not new.is_floating_point():
                continue
            err = ((new.double() - old[k].double()).abs().max() / old[k].double().abs().max()).item()
            if err <= REPRODUCED[new.dtype]:
                kept[k] = old[k]
                if err:
                    print(f"{path}: {k} recomputed {err:.1e} (of its scale) from the committed one, kept")
    return kept


def print_float32_error(name, tensors):
    """The reference's own float32 error: each output `output.X` against its float64 twin `output.X.f64`, relative to
    the largest float64 value (the tests derive their float32 bounds from these numbers). A posterior sample drawn in
    float64 uses other random numbers than the float32 one: its line measures the draw, not rounding."""
    for key in sorted(k for k in tensors if k.endswith(".f64")):
        single, exact = tensors[key[: -len(".f64")]].double(), tensors[key]
        err = ((single - exact).abs().max() / exact.abs().max()).item()
        note = " (another random draw)" if err > 1e-3 else ""
        print(f"{name} {key[: -len('.f64')]}: reference float32 vs float64, relative error {err:.2e}{note}")
