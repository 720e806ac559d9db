"""Replays: a call made again as its checked path made it, without the checks, plans and launch building.

The checked path of a call whose inputs have the layout of an earlier one (shapes, strides, dtypes, device, 16-byte
alignment) and whose other arguments are equal makes the same launches with other tensors in them: the same kernels,
grids, constants, the same buffers to write. A `Replays` table remembers, per call key, what the checked path
launched (launch.recording) and the buffers it made for the kernels (launch.fresh), and makes the next such call by
allocating new buffers of the same layout and launching the recorded launches with this call's tensors in place of
the first one's -- matched by data pointer and dtype (a kernel reads nothing else of a tensor). The same launches on
the same data give the same bits (tests/test_host_path.py). Used by `attention`, `flex_attention` and the SDPA drop-in
(the table `CALLS`: a layout's second call recorded, replays from its third) and by a step's plan
(schedule.SchedulerMetadata: its first call recorded).

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
        self.last = (None, None)  # the last replayed key and its replay: a step's layers repeat one layout

    def __call__(self, key: tuple, inputs: tuple, call, args=()):
        """call(*args)'s result: by its replay where this key has one, else by the call (recorded where due). key:
        the call's arguments that are not tensors, hashable (with their types, so that 1 and True differ); inputs:
        its tensors (None where not given)."""
        try:
            full = (key, batch_invariant.split_keys(), overrides(), torch.is_grad_enabled(), *[
                t if t is None else (t.__class__, t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                for t in inputs])
            if self.aligned:
                full += tuple([t.data_ptr() & 15 for t in inputs[:self.aligned]])
            last, replay = self.last
            entry = replay if full == last else self.calls.get(full, 0)  # == costs less than hashing anew
        except (AttributeError, TypeError):  # an input that is no tensor, an argument that is no key: the
            return call(*args)  # checked path says what is wrong, if anything
        if entry.__class__ is _Replay:
            self.last = full, entry
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
        replay = _Replay.of(rec, inputs, result, self.fixed)
        self._put(full, REFUSED if replay is None else replay)
        return result

    def _put(self, key, entry):
        if key not in self.calls and len(self.calls) >= self.limit:
            del self.calls[next(iter(self.calls))]
        self.calls[key] = entry

    def clear(self):
        self.calls.clear()
        self.last = (None, None)

    def __len__(self):
        return len(self.calls)


def _shared(inputs) -> bool:
    ptrs = [t.data_ptr() for t in inputs if t is not None]
    return len(set(ptrs)) < len(ptrs)


class _Replay:
    """A recorded call: per run its launches, each with the places that take the call's tensors (path into the
    arguments, index into inputs + new buffers, and where the place is a TensorDescriptor's base its other fields),
    the counter keys; the buffers to make (shape, stride, an empty tensor of their dtype and device, fill) and how
    the result is made of them."""

    def __init__(self, runs, buffers, result):
        self.runs, self.buffers, self.result = runs, buffers, result

    @classmethod
    def of(cls, rec: launch.Recording, inputs, result, fixed):
        """The replay of a recording, or None where it cannot be made (see the module's docstring). The inputs share
        no data (Replays checks that first)."""
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
                kept, direct, patches = list(args), [], {}
                for path, i, desc in found:  # hold no tensor of this call (its memory is the caller's)
                    kept[path[0]] = _put(kept[path[0]], path[1:], None)
                    if len(path) == 1 and desc is None:  # an argument that is a tensor: put as it is
                        direct.append((path[0], i))
                    else:
                        patches.setdefault(path[0], []).append((path[1:], i, desc))
                # A tuple argument holding tensors only as its own fields (a bundle): its fields' list, refilled
                # per call; deeper places and descriptors go through _patched.
                shallow = [(a, kept[a].__class__, list(kept[a]), tuple((p[0], i) for p, i, _ in places))
                           for a, places in patches.items()
                           if all(len(p) == 1 and desc is None for p, _, desc in places)]
                deep = tuple((a, places) for a, places in patches.items() if a not in {x[0] for x in shallow})
                bound.append((kernel, grid, kept, kwargs, tuple(direct), tuple(shallow), deep))
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
        if made[0] == "tuple" and all(h[0] == "buffer" for h in made[1]):
            made = ("buffers", [h[1] for h in made[1]])
        return cls(runs, buffers, made)

    def run(self, inputs):
        """The recorded launches on `inputs` and new buffers; the result made of them."""
        values = [*inputs]
        for shape, stride, like, fill in self.buffers:  # like: an empty tensor of the dtype and device
            t = like.new_empty_strided(shape, stride)
            values.append(t if fill is None else t.zero_() if fill == 0 else t.fill_(fill))
        for bound, keys in self.runs:
            launch_list = []
            for kernel, grid, args, kwargs, direct, shallow, deep in bound:
                args = args.copy()
                for a, i in direct:
                    args[a] = values[i]
                for a, cls, fields, places in shallow:
                    fields = fields.copy()
                    for f, i in places:
                        fields[f] = values[i]
                    args[a] = tuple.__new__(cls, fields)
                for a, places in deep:
                    args[a] = _patched(args[a], places, values)
                launch_list.append((kernel, grid, args, kwargs))
            launch.relaunch(launch_list, keys)
        return _made(self.result, values)


def _put(obj, path, x):
    """obj (a value, or a tuple nested along path) with x at path."""
    if not path:
        return x
    parts = list(obj)
    parts[path[0]] = _put(parts[path[0]], path[1:], x)
    return tuple.__new__(obj.__class__, parts)  # a named tuple stays one


def _patched(obj, places, values):
    """obj with this call's tensors at its places ((path, index, descriptor fields or None); path () is obj)."""
    parts = None
    for path, i, desc in places:
        x = values[i] if desc is None else TensorDescriptor(values[i], *desc)
        if not path:
            return x
        if parts is None:
            parts = list(obj)
        parts[path[0]] = _put(parts[path[0]], path[1:], x)
    return tuple.__new__(obj.__class__, parts)


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


def _made(how, values):
    kind = how[0]
    if kind == "buffer":
        return values[how[1]]
    if kind == "buffers":
        return tuple([values[i] for i in how[1]])
    if kind == "tensor":
        _, i, shape, stride = how
        t = values[i]
        return t if t.shape == shape and t.stride() == stride else t.as_strided(shape, stride)
    if kind == "tuple":
        return tuple(_made(h, values) for h in how[1])
    return how[1]


# attention / flex_attention / SDPA drop-in calls: a layout's second call recorded (q, k, v lead the inputs).
CALLS = Replays(limit=256, aligned=3)


def key_of(*values) -> tuple:
    """A call key of plain values (numbers, strings, dtypes, tuples of them, functions) and their types."""
    return values, tuple(map(type, values))


def clear():
    """Forget every recorded attention / flex_attention call (e.g. after changing kernel tables by hand)."""
    CALLS.clear()
