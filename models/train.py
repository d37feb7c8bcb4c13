"""compile_train_step: forward, loss, backward, clipping and the optimizer update as ONE program.

    step = compile_train_step(model, loss_fn, optimizer, x, y)   # example batch
    for ...:
        loss = step(x, y)              # updates model parameters and optimizer state

The program's inputs are the parameters, the optimizer state, the learning rate, the step
number and a dropout seed (runtime values, so schedules and dropout never recompile) and the
batch; its outputs are the loss, the new parameters and the new optimizer state.  The model and
optimizer stay the source of truth: after each call their tensors hold the updated values.
"""
from __future__ import annotations

import contextlib
import gc
import operator
from dataclasses import dataclass
from typing import Callable

import numpy as np

from neural_arch.compiler.autodiff import autodiff
from neural_arch.compiler.ir import Graph, TensorType
from neural_arch.compiler.tensor import Tensor, data_generation
from neural_arch.compiler.trace import call_graph, trace_with_info

from . import nn
from .arena import pack_training_state
from .optim import Optimizer, StateDict, clip_by_global_norm

_DATA = operator.attrgetter("_data")


@dataclass
class TrainStepProgram:
    graph: Graph
    param_names: list[str]
    state_names: list[str]  # per parameter, the optimizer state keys in order
    n_batch: int
    frozen: tuple = ()  # the parameters the loss does not depend on: the step leaves them as they are


def build_train_graph(model, loss_fn: Callable, optimizer: Optimizer, example_batch, clip_norm: float | None = None,
                      name: str = "train_step") -> TrainStepProgram:
    named = list(model.named_parameters())
    by_id = {id(p): n for n, p in named}
    opt_params = [by_id[id(p)] for p in optimizer.params if id(p) in by_id]
    if len(opt_params) != len(optimizer.params):
        raise ValueError("compile_train_step: the optimizer holds parameters that are not the model's")
    params = dict(named)
    batch_types = [b.type if isinstance(b, Tensor) else Tensor(np.asarray(b)).type for b in example_batch]

    # 1. the loss as a graph of (batch..., params..., seed), traced with dropout drawing from the seed
    def loss_graph_fn(seed, *batch):
        with nn.dropout_seed(seed):
            return loss_fn(model, *batch)

    traced = trace_with_info(loss_graph_fn, TensorType((), "int64"), *batch_types, params=params, name="loss")
    g = traced.graph
    if not traced.single_output:
        raise ValueError("compile_train_step: loss_fn must return one scalar tensor")
    name_of_input = {}
    for i in g.inputs:
        if i.kind == "param":
            t = traced.bindings[i.name]
            name_of_input[by_id[id(t)]] = i.name
    wrt = [name_of_input[n] for n in opt_params]
    no_gradient = []
    vg = autodiff(g, wrt, with_value=True, name="loss_and_grads", no_gradient=no_gradient)
    # parameters the loss does not depend on get no gradient: as torch's optimizers skip a
    # parameter whose .grad is None (and the eager opt.step() here does), the step leaves
    # them, their state and their step count as they are (no weight decay, no moment decay)
    frozen = {n for n, w in zip(opt_params, wrt) if w in set(no_gradient)}
    if frozen and len(frozen) == len(opt_params):
        raise ValueError("compile_train_step: the loss depends on none of the optimizer's parameters")
    state_keys = list(optimizer.state_names)
    update = replayed_update(optimizer, state_keys)

    # 2. the whole step: loss and grads, clipping, update
    def step_fn(lr, step, seed, *rest):
        batch = rest[:len(batch_types)]
        ps = rest[len(batch_types):len(batch_types) + len(named)]
        states = rest[len(batch_types) + len(named):]
        pmap = dict(zip([n for n, _ in named], ps))
        feed = []
        args = iter(batch)
        for i in g.inputs:
            if i.kind == "param":
                feed.append(pmap[by_id[id(traced.bindings[i.name])]])
            elif i.name == g.inputs[0].name:
                feed.append(seed)
            else:
                feed.append(next(args))
        outs = call_graph(vg, *feed, typed=True)
        loss, grads = outs[0], outs[1:]
        if clip_norm is not None:
            grads, _ = clip_by_global_norm(list(grads), clip_norm)
        new_params, new_states = [], []
        for k, (pname, gr) in enumerate(zip(opt_params, grads)):
            st = {key: states[k * len(state_keys) + j] for j, key in enumerate(state_keys)}
            if pname in frozen:
                new_p, new_st = pmap[pname], st
            else:
                new_p, new_st = update(pmap[pname], gr, st, lr, step)
                for what, old, new in [(pname, pmap[pname], new_p)] + [(f"{pname}.{k}", st[k], new_st[k]) for k in state_keys]:
                    if (new.shape, new.dtype) != (old.shape, old.dtype):  # (e.g. a product with the float64 lr)
                        raise TypeError(f"compile_train_step: {type(optimizer).__name__}.update turned {what} of "
                                        f"{old.dtype}{list(old.shape)} into {new.dtype}{list(new.shape)} (lr is a "
                                        f"float64 scalar: cast it to the parameter's dtype)")
            new_params.append(new_p)
            new_states += [new_st[key] for key in state_keys]
        return (loss, *new_params, *new_states)

    example_states = []
    for pname in opt_params:
        p = params[pname]
        example_states += [TensorType(p.shape, p.dtype) for _ in state_keys]
    # parameters and optimizer state are named inputs of their kinds
    names = ["lr", "step", "seed"] + [f"batch{i}" for i in range(len(batch_types))] + \
        [n for n, _ in named] + [f"{p}.{k}" for p in opt_params for k in state_keys]
    kinds = ["arg"] * (3 + len(batch_types)) + ["param"] * len(named) + ["state"] * len(example_states)
    graph = trace_with_info(step_fn, TensorType((), "float64"), TensorType((), "int64"), TensorType((), "int64"),
                            *batch_types, *[p.type for _, p in named], *example_states, params={}, name=name,
                            arg_names=names, arg_kinds=kinds).graph
    optimizer.__dict__.pop("_traced_factors", None)  # (Adam's scalar factors of this trace)
    if list(graph.input_names) != names:  # a name taken twice (a parameter called "lr"?)
        raise ValueError(f"compile_train_step: input names collide: {sorted(set(n for n in names if names.count(n) > 1))}")
    return TrainStepProgram(graph, [n for n, _ in named], state_keys, len(batch_types),
                            tuple(n for n in opt_params if n in frozen))


REPLAY_UPDATES = True  # (tests turn it off to compare)


def replayed_update(optimizer: Optimizer, state_keys: list) -> Callable:
    """``optimizer.update`` for tracing the step: a built-in optimizer's update (SGD's,
    Adam's, AdamW's), whose nodes depend only on its arguments' types and the optimizer's
    settings, is traced once per (parameter, gradient, state) types and replayed for every
    other parameter of those types (``Tracer.replay``).  The update was 40-50 ms of the
    small GPT-2 step's 110 ms of tracing (76 parameters of 9 shapes, ~24 nodes each).  A
    user's optimizer, whose update may depend on more (a counter, the call order), is
    traced for every parameter, and so is a subclass of ours."""
    from neural_arch.compiler.tensor import current_tracer
    from .optim import SGD, Adam, AdamW
    if not REPLAY_UPDATES or type(optimizer) not in (SGD, Adam, AdamW):  # (a subclass may change a helper)
        return optimizer.update
    recorded: dict = {}

    def update(p, g, st, lr, step):
        tracer = current_tracer()
        ins = [p, g] + [st[k] for k in state_keys]
        if tracer is None or not all(isinstance(t, Tensor) and t._tracer is tracer for t in ins) or \
                len({t._sym for t in ins}) != len(ins):
            return optimizer.update(p, g, st, lr, step)
        key = (tuple(t.type for t in ins), id(lr), id(step))
        rec = recorded.get(key)
        if rec is not None:
            outs = tracer.replay(*rec, ins)
            return outs[0], dict(zip(state_keys, outs[1:]))
        start = len(tracer.nodes)
        new_p, new_st = optimizer.update(p, g, st, lr, step)
        outs = [new_p] + [new_st.get(k) for k in state_keys]
        if all(isinstance(t, Tensor) and t._tracer is tracer for t in outs):
            recorded[key] = (start, len(tracer.nodes), ins, outs)
        return new_p, new_st
    return update


class TrainStep:
    """The compiled step.  Call it with a batch; it returns the loss (a float) and updates the
    model's parameters and the optimizer's state.

    ``seed`` is the dropout counter: each call adds one and runs with the result as the
    program's dropout seed (the first call with 1).  It is part of the training state: a run
    resumed from a checkpoint sets it to the saved value, or its dropout masks repeat those
    of the first steps (``narch train gpt2`` saves it as ``dropout_seed``)."""

    def __init__(self, model, optimizer: Optimizer, program: TrainStepProgram, runner, backend: str,
                 runtime_program=None):
        self.model, self.optimizer, self.program, self.backend = model, optimizer, program, backend
        self.runtime_program = runtime_program  # the native Program (kernels, memory plan, profile)
        self._run = runner
        self.graph = program.graph
        self._params = dict(model.named_parameters())
        self._opt_order = [n for n in program.param_names if id(self._params[n]) in optimizer.state]
        self.seed = 0  # the dropout counter (see the class docstring)

    def __call__(self, *batch) -> float:
        opt = self.optimizer
        fast = self.__dict__.get("_fast")
        program = self.runtime_program
        if fast is not None and fast[0] == data_generation() and opt.state is fast[1] and \
                program.runs == fast[3] and len(batch) == self.program.n_batch:
            # no parameter or state array replaced since the last step, which updated them
            # all in place, and nobody else ran the program since: it runs on them again
            # without looking at them, and only the scalars, the batch and the step counts
            # are touched (the count is read: another step sharing the optimizer moves it)
            _, _, counted, _, (lr, sn, sd), loss = fast
            step_no = counted[0]["step"] + 1
            opt.step_count += 1
            self.seed += 1
            lr[()] = opt.lr
            sn[()] = step_no
            sd[()] = self.seed
            program.run_fixed(
                lr, sn, sd, *[np.ascontiguousarray(b.data if isinstance(b, Tensor) else b) for b in batch], out=loss)
            for st in counted:  # (dict's own setter: the count is no replacement of an array)
                dict.__setitem__(st, "step", step_no)
            self._fast = (fast[0], fast[1], counted, program.runs, fast[4], loss)
            return float(loss[0])
        self._fast = None
        opt.step_count += 1
        fixed = self.__dict__.get("_fixed")
        if fixed is None:  # the parameter tensors, in the optimizer's order and the program's
            fixed = self._fixed = ([self._params[n] for n in self._opt_order],
                                   [self._params[n] for n in self.program.param_names],
                                   [k for k, n in enumerate(self._opt_order) if n not in self.program.frozen])
        order, ptensors, moving = fixed
        states = list(map(opt.state.__getitem__, map(id, order)))  # (opt.state_for, without a call each)
        counted = list(map(states.__getitem__, moving))  # (the states whose step count moves)
        keys = self.program.state_names
        step_no = counted[0]["step"] + 1
        self.seed += 1
        program = self.runtime_program
        if program is None:
            inputs = [np.asarray(opt.lr, np.float64), np.asarray(step_no, np.int64), np.asarray(self.seed, np.int64)]
            inputs += [np.asarray(b.data if isinstance(b, Tensor) else b) for b in batch]
            inputs += [p.data for p in ptensors]
            inputs += [st[k].data for st in states for k in keys]
            outs = self._run(inputs)
        else:
            # the native program directly (what the runner does, without its per-call costs):
            # the scalars go in through the same three 0-d arrays every step, so the program
            # keeps their data pointers, as it keeps those of the parameters and states.  An
            # MLP step takes ~0.25 ms, and a GPT-2 step leaves the Python objects read here
            # out of cache, so the per-step Python is done in maps (C loops)
            scalars = self.__dict__.get("_scalars")
            if scalars is None:
                scalars = self._scalars = (np.zeros((), np.float64), np.zeros((), np.int64), np.zeros((), np.int64))
            lr, sn, sd = scalars
            lr[()] = opt.lr
            sn[()] = step_no
            sd[()] = self.seed
            contiguous = np.ascontiguousarray
            # (eager tensors' arrays: _data is what the data property returns for them)
            fixed_now = list(map(_DATA, ptensors))
            fixed_now += map(_DATA, map(dict.__getitem__, [st for st in states for _ in keys], keys * len(states)))
            given = [contiguous(a) for a in fixed_now]  # (a tensor's array is C-contiguous: the same objects)
            outs = program(lr, sn, sd, *[contiguous(b.data if isinstance(b, Tensor) else b) for b in batch], *given)
            expect = self.__dict__.get("_expect_outs")
            if expect is None:
                expect = self._expect_outs = [self.program.param_names.index(n) for n in self._opt_order] + \
                    list(range(len(ptensors), len(fixed_now)))
            if all(map(operator.is_, outs[1:], map(fixed_now.__getitem__, expect))):
                # every parameter and state was written over the tensor's own array: the
                # next steps may run without looking at them while nothing replaces any
                for st in counted:
                    dict.__setitem__(st, "step", step_no)
                # (dicts that count their changes: a plain dict put in their place would not)
                tracked = type(opt.state) is StateDict and all(type(st) is StateDict for st in states)
                if tracked and len(batch) == self.program.n_batch and \
                        program.fresh_outputs() == (self.graph.outputs[0],):
                    # (the loss goes into one array, allocated once)
                    self._fast = (data_generation(), opt.state, counted, program.runs, scalars, [np.empty_like(outs[0])])
                return float(outs[0])
        loss = float(outs[0])
        k = 1
        for p in order:
            if outs[k] is not p.data:  # (updated in place: nothing to do)
                p.data = outs[k]
            k += 1
        for st in counted:
            st["step"] = step_no
        for st in states:
            for key in keys:
                if outs[k] is not st[key].data:
                    st[key] = Tensor(outs[k])
                k += 1
        return loss


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off while compiling: tracing and the passes make
    hundreds of thousands of small acyclic objects, and every collection the allocations
    trigger walks all of them (and the model); about 15% of a cached compile.  Whatever
    cycles compiling leaves are collected once the collector is back on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def compile_train_step(model, loss_fn: Callable, optimizer: Optimizer, *example_batch, clip_norm: float | None = None,
                       backend: str = "llvm", flush_denormals: bool = True) -> TrainStep:
    """Build ONE program for forward, loss, backward, (clipping) and update.

    ``loss_fn(model, *batch) -> scalar tensor``.  ``backend="llvm"`` compiles it to native code;
    ``"interpreter"`` runs the same graph through the NumPy interpreter.  ``flush_denormals``
    (llvm, x86): the step runs with subnormal floats taken as zero (the ``Program`` option of
    that name).  Adam moments of parameters whose gradient stays zero otherwise decay into
    the subnormal range and stay there, and every operation on them is slow (the MLP
    benchmark's step: 238 -> 217 us)."""
    with _gc_paused():
        return _compile_train_step(model, loss_fn, optimizer, example_batch, clip_norm, backend, flush_denormals)


def train_program_options(graph, model, optimizer, flush_denormals: bool = True) -> dict:
    """The ``Program`` options of a compiled training step over ``graph`` (from
    ``build_train_graph``): parameters and optimizer state updated in place -- each new value
    written over the array it replaces (outputs: loss, new params in optimizer order, then
    their states) -- ``flush_denormals``, and ``adapt_threads`` (each call on one thread or
    all, whichever measures faster: ``runtime.program.ThreadChoice``)."""
    pos = {gi.name: k for k, gi in enumerate(graph.inputs)}
    by_id = {id(p): n for n, p in model.named_parameters()}
    order = [by_id[id(p)] for p in optimizer.params]
    keys = list(optimizer.state_names)
    pairs = {1 + k: pos[n] for k, n in enumerate(order)}
    pairs.update({1 + len(order) + k * len(keys) + j: pos[f"{n}.{key}"]
                  for k, n in enumerate(order) for j, key in enumerate(keys)})
    return {"inplace": pairs, "flush_denormals": bool(flush_denormals), "adapt_threads": True}


def _compile_train_step(model, loss_fn, optimizer, example_batch, clip_norm, backend, flush_denormals) -> TrainStep:
    if backend == "llvm":
        from neural_arch.runtime.program import install_pool_in_background
        install_pool_in_background()  # the native runtime's setup overlaps the tracing
    prog = build_train_graph(model, loss_fn, optimizer, example_batch, clip_norm)
    program = None
    if backend == "interpreter":
        from neural_arch.runtime.interpreter import interpret

        def runner(inputs):
            return interpret(prog.graph, inputs)
    elif backend == "llvm":
        from neural_arch.runtime.program import Program
        program = Program(prog.graph, options=train_program_options(prog.graph, model, optimizer, flush_denormals))
        pack_training_state(optimizer)

        def runner(inputs):
            return program(*[np.ascontiguousarray(a) for a in inputs])
    else:
        raise ValueError(f"compile_train_step: backend must be 'llvm' or 'interpreter', got {backend!r}")
    return TrainStep(model, optimizer, prog, runner, backend, program)
