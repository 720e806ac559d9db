"""Replays: a call made again as its checked path made it, without the checks, plans and launch building.

The checked path of a call whose inputs have the layout of an earlier one (shapes, strides, dtypes, device, 16-byte
alignment) and whose other arguments are equal makes the same launches with other tensors in them: the same kernels,
grids, constants, the same buffers to write. A `Replays` table remembers, per call key, what the checked path
launched (launch.recording) and the buffers it made for the kernels (launch.fresh), and makes the next such call by
allocating new buffers of the same layout and launching the recorded launches with this call's tensors in place of
the first one's -- matched by data pointer and dtype (a kernel reads nothing else of a tensor). The same launches on
the same data give the same bits (tests/test_host_path.py). Used by `attention`, `flex_attention` and the SDPA drop-in
(the table `CALLS`: a layout's second call recorded, replays from its third) and by a step's plan
(schedule.SchedulerMetadata: its first call recorded). A replay is two small functions written as straight-line
Python when it is recorded (`_Code`): `run` makes the buffers and the launches with the call's tensors in place,
`matches` tests a call's key field by field; the table tries its last replay's `matches` before it builds and
hashes the key (a step's layers repeat one layout). `_Replay.source` holds their text.

Not remembered (the checked path runs every time): a call with an input that requires grad while grad is enabled
(its output joins autograd's graph), a launch holding a tensor the call made that is not one of its fresh buffers
(e.g. a mask classified into tables, a dropout seed: per-call values), a result that is not a view of a fresh buffer,
two inputs sharing data, and calls under torch.compile (the entry points check that)."""
import dataclasses
import math

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from . import batch_invariant
from .kernels import launch
from .kernels.configs import overrides

REFUSED = False  # a key whose calls cannot be replayed (their launches hold per-call tensors)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class Replays:
    """Call key -> what its checked path launched. `sightings`: calls of a key that run checked before one is
    recorded (0: the first is; 1: the second -- so a key seen once, e.g. a sequence length that grows every step,
    costs no recording); at most `limit` keys (the oldest forgotten first). `fixed`: tensors every replay keeps (a
    plan's scratch). `aligned`: the leading inputs whose 16-byte alignment is in the key (q, k, v where the
    launchers choose TMA descriptors by it, kernels.launch.tma_ok; nothing else on the host reads a pointer)."""

    def __init__(self, limit: int, sightings: int = 1, fixed=(), aligned: int = 0):
        self.limit, self.sightings, self.aligned = limit, sightings, aligned
        self.fixed = {t.data_ptr() for t in fixed if t is not None}
        self.calls = {}
        self.last = None  # the last replay run: a step's layers repeat one layout, tried first by its own test

    def __call__(self, key: tuple, inputs: tuple, call, args=()):
        """call(*args)'s result: by its replay where this key has one, else by the call (recorded where due). key:
        the call's arguments that are not tensors, hashable (with their types, so that 1 and True differ); inputs:
        its tensors (None where not given)."""
        split, given, grad, last = batch_invariant.split_keys(), overrides(), torch.is_grad_enabled(), self.last
        try:
            if last is not None and last.matches(key, inputs, split, given, grad):
                entry = last
            else:
                full = (key, split, given, grad, *[
                    t if t is None else (t.__class__, t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                    for t in inputs])
                if self.aligned:
                    full += tuple([t.data_ptr() & 15 for t in inputs[:self.aligned]])
                entry = self.calls.get(full, 0)
        except (AttributeError, TypeError, RuntimeError):  # an input that is no tensor, an argument that is no
            return call(*args)  # key: the checked path says what is wrong, if anything
        if entry.__class__ is _Replay:
            self.last = entry
            return entry.run(inputs)
        if entry is REFUSED:
            return call(*args)
        if entry < self.sightings:
            self._put(full, entry + 1)
            return call(*args)
        if not all(t is None or t.__class__ in _PLAIN and not (full[3] and t.requires_grad) for t in inputs):
            self._put(full, REFUSED)  # a tensor subclass, or a call autograd records (its output joins the graph)
            return call(*args)
        if _shared(inputs):  # not recorded, nor refused: another call of this key may not share
            return call(*args)
        with launch.recording() as rec:
            result = call(*args)
        replay = _Replay.of(rec, inputs, result, self.fixed, full, self.aligned)
        self._put(full, REFUSED if replay is None else replay)
        return result

    def _put(self, key, entry):
        if key not in self.calls and len(self.calls) >= self.limit:
            del self.calls[next(iter(self.calls))]
        self.calls[key] = entry

    def clear(self):
        self.calls.clear()
        self.last = None

    def __len__(self):
        return len(self.calls)


def _shared(inputs) -> bool:
    ptrs = [t.data_ptr() for t in inputs if t is not None]
    return len(set(ptrs)) < len(ptrs)


class _Replay:
    """A recorded call, as two functions written once per recording in straight-line Python (`source` holds their
    text): `run(inputs)` makes the buffers (their layouts, fills), the launches with the call's tensors in place and
    the result (_run); `matches(...)` tests a call's key against the recorded one (_matches). A replay runs on the
    host's lean path, so no loop walks the recording per call."""

    def __init__(self, run: "_Code", matches: "_Code"):
        self.source = run.text + "\n" + matches.text
        self.run, self.matches = run.function(), matches.function()

    @classmethod
    def of(cls, rec: launch.Recording, inputs, result, fixed, full: tuple, aligned: int):
        """The replay of a recording of a call of key `full` (Replays), or None where it cannot be made (see the
        module's docstring). The inputs share no data (Replays checks that first)."""
        where = {t.data_ptr(): (i, t.dtype) for i, t in enumerate(inputs) if t is not None}
        buffers = []

        def index(x):
            """x's index among inputs + buffers, -1 for a fixed tensor, None where it has none."""
            ptr = x.data_ptr()
            if ptr in fixed:
                return -1
            i, dtype = where.get(ptr, (None, None))
            if i is None:
                if ptr not in rec.buffers:
                    return None
                made, fill = rec.buffers[ptr]
                i, dtype = where[ptr] = len(inputs) + len(buffers), made.dtype
                buffers.append((made.shape, made.stride(), made.new_empty(0), fill))
            return i if dtype == x.dtype else None

        def places(obj, path, found):
            """Adds obj's tensor places under `path` to found; False where one has no index."""
            if isinstance(obj, torch.Tensor):
                i = index(obj)
                if i is None:
                    return False
                if i >= 0:
                    found.append((path, i, None))
            elif isinstance(obj, TensorDescriptor):
                i = index(obj.base)
                if i is None:
                    return False
                if i >= 0:
                    found.append((path, i, tuple(getattr(obj, f.name) for f in dataclasses.fields(obj)[1:])))
            elif isinstance(obj, tuple):
                return all(places(x, path + (f,), found) for f, x in enumerate(obj))
            return True

        runs = []
        for name, launch_list in rec.runs:
            bound = []
            for kernel, grid, args, kwargs in launch_list:
                found = []
                if not all(places(arg, (a,), found) for a, arg in enumerate(args)):
                    return None
                bound.append((kernel, grid, args, kwargs, found))
            runs.append((bound, launch.counted(launch_list, name)))

        def shape_of(x):
            """How the result is made: a buffer's index with the view's shape and strides, or x itself."""
            if isinstance(x, tuple):
                made = [shape_of(y) for y in x]
                return None if None in made else ("tuple", made)
            if not isinstance(x, torch.Tensor):
                return ("value", x)
            i = index(x)
            if i is None or i < len(inputs):  # a result is a fresh buffer's view
                return None
            return ("tensor", i, x.shape, x.stride())

        made = shape_of(result)
        if made is None:
            return None
        made = _as_viewed(made, buffers, len(inputs), set())
        return cls(_run(len(inputs), runs, buffers, made), _matches(full, len(inputs), aligned))



class _Code:
    """A function written once per recording as straight-line Python: its lines, and its constants by name."""

    def __init__(self, name: str, params: str, constants=()):
        self.name, self.lines, self.constants = name, [f"def {name}({params}):"], dict(constants)

    def const(self, x) -> str:
        name = f"c{len(self.constants)}"
        self.constants[name] = x
        return name

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def function(self):
        namespace = dict(self.constants)
        exec(compile(self.text, f"<fused_attn replay {self.name}>", "exec"), namespace)
        return namespace[self.name]


def _unpacked(n_inputs: int) -> list:
    return ["    " + "".join(f"i{i}, " for i in range(n_inputs)) + "= inputs"] if n_inputs else []


def _run(n_inputs: int, runs, buffers, made) -> _Code:
    """`run(inputs)` of a recording: inputs i0.., new buffers b0.. (shape, strides, an empty tensor of their dtype
    and device, fill), per run its launches -- each argument rebuilt around the places that take the call's tensors
    ((path, index, a TensorDescriptor's other fields or None), found by _Replay.of), everything else a constant --
    and the counter keys (launch.relaunch), then the result (`made`)."""
    code = _Code("run", "inputs", {"_new": tuple.__new__, "_relaunch": launch.relaunch,
                                   "_descriptor": TensorDescriptor, "_view": _view})
    const = code.const

    def value(i):
        return f"i{i}" if i < n_inputs else f"b{i - n_inputs}"

    def expr(obj, places):
        """obj with the call's tensors at `places` (paths relative to obj)."""
        if not places:
            return const(obj)
        for path, i, desc in places:
            if not path:
                return value(i) if desc is None else f"_descriptor({value(i)}, *{const(desc)})"
        parts = [expr(x, [(p[1:], i, d) for p, i, d in places if p[0] == f]) for f, x in enumerate(obj)]
        items = "(" + "".join(part + ", " for part in parts) + ")"
        return items if obj.__class__ is tuple else f"_new({const(obj.__class__)}, {items})"

    def result(how):
        kind = how[0]
        if kind == "buffer":
            return value(how[1])
        if kind == "tensor":
            return f"_view({value(how[1])}, {const(how[2])}, {const(how[3])})"
        if kind == "tuple":
            return "(" + "".join(result(h) + ", " for h in how[1]) + ")"
        return const(how[1])

    code.lines += _unpacked(n_inputs)
    for j, (shape, stride, like, fill) in enumerate(buffers):
        code.lines.append(f"    b{j} = {const(like.new_empty_strided)}({const(shape)}, {const(stride)})")
        if fill is not None:
            code.lines.append(f"    b{j}.zero_()" if fill == 0 else f"    b{j}.fill_({const(fill)})")
    for bound, keys in runs:
        launches = [f"({const(kernel)}, {const(grid)}, {expr(args, found)}, {const(kwargs)})"
                    for kernel, grid, args, kwargs, found in bound]
        code.lines.append(f"    _relaunch([{', '.join(launches)}], {const(keys)})")
    code.lines.append(f"    return {result(made)}")
    return code


def _matches(full: tuple, n_inputs: int, aligned: int) -> _Code:
    """`matches(key, inputs, split, given, grad)`: whether a call's key is `full` (Replays' key: the call's key, the
    batch-invariant split, the config overrides, the grad mode, per input its class, shape, strides, dtype, device
    and requires_grad or None, the alignment of the first `aligned`), field by field without building it."""
    code = _Code("matches", "key, inputs, split, given, grad")
    const = code.const
    key, split, given, grad = full[:4]
    code.lines.append(f"    if key != {const(key)} or len(inputs) != {n_inputs} or split != {const(split)} or "
                      f"given != {const(given)} or grad is not {grad}:")
    code.lines.append("        return False")
    code.lines += _unpacked(n_inputs)
    tests = []
    for i, sig in enumerate(full[4:4 + n_inputs]):
        if sig is None:
            tests.append(f"i{i} is None")
        else:
            cls, shape, stride, dtype, device, requires_grad = sig
            tests.append(f"i{i}.__class__ is {const(cls)} and i{i}.shape == {const(shape)} and "
                         f"i{i}.stride() == {const(stride)} and i{i}.dtype is {const(dtype)} and "
                         f"i{i}.device == {const(device)} and i{i}.requires_grad is {requires_grad}")
    tests += [f"i{i}.data_ptr() & 15 == {a}" for i, a in enumerate(full[4 + n_inputs:])]
    code.lines.append("    return (" + "\n            and ".join(tests or ["True"]) + ")")
    return code


def _view(t, shape, stride):
    """A result that views a buffer in another shape or strides (a buffer made in its own layout is returned as it
    is: _as_viewed)."""
    return t if t.shape == shape and t.stride() == stride else t.as_strided(shape, stride)


def _as_viewed(how, buffers, first: int, done: set):
    """`how` with the buffers a result tensor views whole (a permutation, a squeeze) made in the view's own shape
    and strides, returned as they are ("buffer"): the kernels read only the data pointer."""
    if how[0] == "tuple":
        return ("tuple", [_as_viewed(h, buffers, first, done) for h in how[1]])
    if how[0] == "tensor" and how[1] not in done:
        _, i, shape, stride = how
        made_shape, made_stride, like, fill = buffers[i - first]
        if _extent(shape, stride) == _extent(made_shape, made_stride) == math.prod(made_shape) == math.prod(shape):
            buffers[i - first] = (shape, stride, like, fill)
            done.add(i)
            return ("buffer", i)
    return how


def _extent(shape, stride) -> int:
    """Elements from a dense view's first to one past its last."""
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0


# attention / flex_attention / SDPA drop-in calls: a layout's second call recorded (q, k, v lead the inputs).
CALLS = Replays(limit=256, aligned=3)


def key_of(*values) -> tuple:
    """A call key of plain values (numbers, strings, dtypes, tuples of them, functions) and their types."""
    return values, tuple(map(type, values))


def clear():
    """Forget every recorded attention / flex_attention call (e.g. after changing kernel tables by hand)."""
    CALLS.clear()
