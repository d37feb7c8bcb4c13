"""One buffer, in 2 MB pages, for an optimizer's parameters and their state tensors.

Every optimizer lays out an arena when it is made (``StateArena``): a slot for each
parameter followed by one for each of its state tensors (Adam's ``exp_avg``,
``exp_avg_sq``), 64-byte aligned, in one ``huge_page_buffer``.  Its fresh state tensors
(zeros) are views of their slots from the start: untouched pages, which read as zeros and
cost no memory until written.  A compiled training step moves the parameters into their
slots (``pack_training_state``, called by ``compile_train_step``): the step then reads and
writes a parameter and its moments in one buffer, laid out the same in every process.

Why one buffer: NumPy gives each array its own 4 KB pages, wherever they fall physically,
so the weight-gradient kernels that read and write a parameter and both moments at once met
a different share of cache conflicts in every process: the MLP benchmark's 256x256 update
took 66, 82, 83 or 87 us depending on the process, and 63-64 us every time once packed
(docs/benchmarks.md, sixth session); the small GPT-2 step runs 3 % faster in 2 MB pages.
Why the state starts there: moving fresh zero moments into the buffer at compile time
meant reading them to know they are zero (41 ms of page faults for the small GPT-2 step's
86 MB), or writing them; in their slots already, they are left alone.
"""
from __future__ import annotations

import math

import numpy as np

from neural_arch.compiler.tensor import Tensor, place_data

HUGE_PAGE = 2 << 20
ALIGN = 64


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of zeroed memory, 2 MB aligned, private to this process (a forked child
    gets a copy-on-write snapshot, as of any NumPy array) and backed by transparent huge
    pages where the kernel allows them (``madvise(MADV_HUGEPAGE)``).  Where anonymous
    private mappings are not available, 64-byte aligned NumPy memory."""
    import mmap
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if None not in flags:
        size = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
        try:
            mm = mmap.mmap(-1, size + HUGE_PAGE, flags=flags[0] | flags[1])
        except (OSError, ValueError):
            mm = None
        if mm is not None:
            raw = np.frombuffer(mm, np.uint8)  # (keeps the mapping alive)
            off = (-raw.ctypes.data) % HUGE_PAGE
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    mm.madvise(mmap.MADV_HUGEPAGE, off, size)
                except OSError:  # (no transparent huge pages here: 4 KB pages, still aligned)
                    pass
            return raw[off:off + nbytes]
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + nbytes]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_copies(arrays: list) -> list:
    """Copies of ``arrays`` laid out as an arena lays out a step's parameters and moments:
    one ``huge_page_buffer``, each 64-byte aligned (for a profile of the step).  Arrays of
    zero bytes are left to the zeroed buffer's untouched pages."""
    sizes = [_aligned(a.nbytes) for a in arrays]
    buf = huge_page_buffer(sum(sizes))
    out, at = [], 0
    for a, n in zip(arrays, sizes):
        v = buf[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
        if not _zero_bytes(a):
            v[...] = a
        out.append(v)
        at += n
    return out


def _zero_bytes(a: np.ndarray) -> bool:
    """Whether every byte of ``a`` is 0 (-0.0 is not: its sign bit is set)."""
    return a.flags.c_contiguous and not a.reshape(-1).view(np.uint8).any()


class StateArena:
    """Slots for ``params`` and, after each, one per name in ``state_names`` (the parameter's
    shape and dtype), 64-byte aligned, in one ``huge_page_buffer`` (``self.buffer``).
    ``view(p, name)``: the slot of parameter ``p`` (``name`` None) or of its state ``name``.

    A slot is given to one tensor, once (``take``): as the storage of a fresh state tensor
    (``fresh``), or when ``pack_training_state`` moves a tensor in.  It is never written
    for another tensor afterwards: whoever holds the first one (a state replaced by a
    reset, a tensor the caller kept) keeps its values."""

    def __init__(self, params: list, state_names: tuple):
        self.state_names = tuple(state_names)
        self.param_ids = [id(p) for p in params]
        specs = [(tuple(p.shape), np.dtype(p.dtype)) for p in params]
        per = 1 + len(self.state_names)
        sizes = [_aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in specs]
        self.buffer = huge_page_buffer(sum(sizes) * per)
        self._slots: dict = {}
        self._taken: set = set()
        at = 0
        for pid, (shape, dtype), n in zip(self.param_ids, specs, sizes):
            nbytes = math.prod(shape) * dtype.itemsize
            for name in (None,) + self.state_names:
                self._slots[pid, name] = self.buffer[at:at + nbytes].view(dtype).reshape(shape)
                at += n

    def view(self, p, name: str | None = None) -> np.ndarray:
        return self._slots[id(p), name]

    def free(self, p, name: str | None = None) -> bool:
        """Whether the slot exists and was never given to a tensor."""
        key = (id(p), name)
        return key in self._slots and key not in self._taken

    def take(self, p, name: str | None = None) -> np.ndarray:
        self._taken.add((id(p), name))
        return self._slots[id(p), name]

    def fresh(self, p, name: str) -> np.ndarray:
        """Zeros of ``p``'s shape and dtype for its state ``name``: its slot where that is
        free (untouched memory), else a new array (a reset after steps have written it, a
        parameter added since the arena was laid out)."""
        return self.take(p, name) if self.free(p, name) else np.zeros(p.shape, p.dtype)

    def fits(self, optimizer) -> bool:
        """Whether this arena was laid out for the optimizer's parameters and state names."""
        return self.param_ids == [id(p) for p in optimizer.params] and \
            self.state_names == tuple(optimizer.state_names)

    def __reduce__(self):  # (a copied optimizer lays out its own: the buffer is this process's memory)
        return type(None), ()


def _tensors(optimizer, names: tuple) -> list:
    """(parameter, state name or None, tensor) in arena order, each tensor once (the first
    place it is met) and only where it is a tensor."""
    out, seen = [], set()
    for p in optimizer.params:
        st = optimizer.state.get(id(p), {})
        for name in (None,) + names:
            t = p if name is None else st.get(name)
            if isinstance(t, Tensor) and id(t) not in seen:
                seen.add(id(t))
                out.append((p, name, t))
    return out


def pack_training_state(optimizer) -> np.ndarray:
    """Move the optimizer's parameters and their state tensors into their slots of its arena
    (``StateArena``): each keeps its values and becomes a view of its slot
    (``compiler.tensor.place_data``).  A tensor already in its slot (fresh moments,
    everything after a first compiled step) is left alone.  A slot already given to another
    tensor is never written: then (state replaced by eager steps or a checkpoint, state
    swapped between parameters, the optimizer's parameters or state names changed) the
    optimizer gets a new arena and every tensor is copied into it.  A tensor of another
    shape or dtype than its slot's, or met a second time, stays where it is.  Returns the
    buffer.  Arrays taken from the tensors before are no longer theirs: the step writes the
    new ones."""
    arena = optimizer.__dict__.get("_arena")
    names = tuple(optimizer.state_names)
    moves = None
    if arena is not None and arena.fits(optimizer):
        moves = []
        for p, name, t in _tensors(optimizer, names):
            slot, a = arena.view(p, name), t.data
            if a.shape != slot.shape or a.dtype != slot.dtype:
                continue
            if a.ctypes.data == slot.ctypes.data and a.flags.c_contiguous and a.flags.writeable:
                continue  # (in its slot already)
            if not arena.free(p, name):
                moves = None  # (its slot is another tensor's storage)
                break
            moves.append((p, name, t))
    if moves is None:
        arena = optimizer._arena = StateArena(optimizer.params, names)
        moves = [(p, name, t) for p, name, t in _tensors(optimizer, names)
                 if (t.data.shape, t.data.dtype) == (arena.view(p, name).shape, arena.view(p, name).dtype)]
    for p, name, t in moves:  # (every destination is a slot no tensor had: no source overlaps it)
        slot = arena.take(p, name)
        slot[...] = t.data
        place_data(t, slot)
    return arena.buffer
