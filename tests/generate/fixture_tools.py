"""Helpers of the fixture generators: the official code run in float64, and fixtures that do not churn.

`float64()`: the float64 expected outputs (keys `<float32 key>.f64`) come from the official code itself, run on the
same float32 weights (exactly representable in float64) and inputs. Official code names float32 where it means "at
least float32" (EDM's preconditioning, attention scores, DiT's `t.float()`); inside `float64(modules)` every float32
that it asks for is float64 instead (in calls, and as `torch.float32` read in the given official modules, so that
EDM's `assert F_x.dtype == dtype` holds), tensors it creates without a dtype are float64, and any operation that still
produces a float32, float16 or bfloat16 tensor is an error, so the numbers are float64 throughout.

`save_fixture()`: a reference run on another CPU (or thread count) gives float32 outputs that differ in the last bits,
and float64 ones that differ at 1e-16. A regenerated tensor that agrees with the committed one to within that noise
floor (NOISE_FLOOR of its dtype, relative to the tensor's largest value) keeps the committed bits, so rerunning a
generator on another machine changes no fixture; a larger difference, a new key or a new shape is written fresh and
reported.
"""

import contextlib
import os
import sys
import types

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

NOISE_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative to the tensor's largest value
LOW = (torch.float32, torch.float16, torch.bfloat16)


class _AskForFloat64(TorchFunctionMode):
    """torch.float32 in a call (dtype= or a positional dtype, as in `x.to(torch.float32)`) and `Tensor.float()`
    become float64; half precision is refused."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        elif func in (torch.Tensor.half, torch.Tensor.bfloat16):
            raise RuntimeError(f"the official code asked for half precision ({func.__name__}) in a float64 run")
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


class _RefuseLowPrecision(TorchDispatchMode):
    """Every operator's floating-point outputs must be float64. Data turned into a tensor as it is (lift_fresh: a
    numpy float32 constant, such as EDM2's resampling filter) is not arithmetic; what is computed from it is checked."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.lift_fresh.default:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype in LOW:
                raise RuntimeError(f"{func} gave a {t.dtype} tensor in a float64 run of the official code")
        return out


class _TorchWithFloat64(types.ModuleType):
    """torch, except that torch.float32 (torch.float) is torch.float64."""

    float32 = float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def float64(modules=()):
    """Run the official code (on a `.double()` network and float64 inputs) in float64 throughout; `modules`: the
    official modules whose own `torch.float32` (under whatever name they import torch) should read float64."""
    default = torch.get_default_dtype()
    patched = [(m, name) for m in modules for name, value in vars(m).items() if value is torch]
    torch.set_default_dtype(torch.float64)
    for m, name in patched:
        setattr(m, name, _TorchWithFloat64("torch"))
    try:
        with _AskForFloat64(), _RefuseLowPrecision():
            yield
    finally:
        torch.set_default_dtype(default)
        for m, name in patched:
            setattr(m, name, torch)


def modules_under(*folders):
    """The imported modules whose source lies under one of `folders` (an official checkout): what `float64` patches."""
    roots = [os.path.join(os.path.abspath(f), "") for f in folders]
    return [
        m
        for m in list(sys.modules.values())
        if os.path.abspath(getattr(m, "__file__", None) or "/nonexistent").startswith(tuple(roots))
    ]


def relative_error(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def save_fixture(path, tensors, metadata=None):
    """save_file, keeping the committed bits of each tensor that a rerun reproduces to within its noise floor; returns
    the tensors the file holds."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    committed = load_file(path) if os.path.exists(path) else {}
    kept, new_keys, changed = 0, [], []
    for k, new in tensors.items():
        old = committed.get(k)
        if old is None or old.dtype != new.dtype or old.shape != new.shape:
            new_keys.append(k)
        elif torch.equal(old, new):
            tensors[k] = old  # the very bits (torch.equal takes -0.0 for 0.0)
        elif new.dtype in NOISE_FLOOR and relative_error(new, old) <= NOISE_FLOOR[new.dtype]:
            tensors[k] = old
            kept += 1
        else:
            err = relative_error(new, old) if new.is_floating_point() else float("nan")
            changed.append(f"{k} (relative difference {err:.1e})")
    gone = sorted(set(committed) - set(tensors))
    if committed and not (new_keys or changed or gone) and safe_open(path, "pt").metadata() == metadata:
        print(f"{path}: unchanged ({kept} tensors kept from the committed file: a rerun differed within the noise floor)")  # fmt: skip
        return tensors
    save_file(tensors, path, metadata=metadata)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB; {kept} tensors kept from the committed file (a rerun "
          f"differed within the noise floor), {len(new_keys)} new, {len(changed)} changed{': ' if changed else ''}"
          f"{', '.join(changed)}{'; dropped: ' + ', '.join(gone) if gone else ''}")  # fmt: skip
    return tensors


def report(tensors, name, exclude=()):
    """Print the official code's own float32 error (float32 vs float64 outputs), worst over the keys with both."""
    pairs = [k for k in tensors if k + ".f64" in tensors and k not in exclude]
    worst = max(pairs, key=lambda k: relative_error(tensors[k], tensors[k + ".f64"]))
    err = relative_error(tensors[worst], tensors[worst + ".f64"])
    print(
        f"{name}: official float32 vs float64, worst {err:.2e} of the output scale ({worst}, of {len(pairs)} outputs)"
    )
