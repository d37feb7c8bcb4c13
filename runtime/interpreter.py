"""The reference interpreter: executes any Graph node by node with the NumPy references.

``oracle=True`` promotes every float32 value to float64 (the differential-test oracle)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from neural_arch.compiler.ir import Graph, TensorType
from neural_arch.compiler.ops.registry import OpError, get


def _bind_inputs(graph: Graph, inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        missing = [i.name for i in graph.inputs if i.name not in inputs]
        if missing:
            raise TypeError(f"{graph.name}: missing inputs {', '.join('%' + m for m in missing)}")
        values = [inputs[i.name] for i in graph.inputs]
    else:
        values = list(inputs)
        if len(values) != len(graph.inputs):
            raise TypeError(f"{graph.name} takes {len(graph.inputs)} inputs "
                            f"({', '.join('%' + i.name for i in graph.inputs)}), got {len(values)}")
    env = {}
    for gi, v in zip(graph.inputs, values):
        arr = np.asarray(v.data if hasattr(v, "data") and not isinstance(v, np.ndarray) else v)
        if arr.shape != gi.type.shape or arr.dtype.name != gi.type.dtype:
            raise TypeError(f"{graph.name}: input %{gi.name} expects {gi.type}, "
                            f"got {TensorType(arr.shape, arr.dtype.name)}")
        env[gi.name] = arr
    return env


def interpret(graph: Graph, inputs: Sequence | Mapping, oracle: bool = False) -> list[np.ndarray]:
    """Run ``graph`` on ``inputs`` (positional over graph.inputs, or a name -> array mapping)."""
    env = _bind_inputs(graph, inputs)

    def widen(t: TensorType) -> TensorType:
        return TensorType(t.shape, "float64") if oracle and t.dtype == "float32" else t

    if oracle:
        env = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in env.items()}
    for n in graph.nodes:
        prim = get(n.op)
        out_t = widen(n.type)
        attrs = n.attr
        if oracle and attrs.get("dtype") == "float32":
            attrs["dtype"] = "float64"
        try:
            res = prim.reference(*[env[i] for i in n.inputs], out=out_t, **attrs)
        except OpError as e:
            raise e.with_loc(n.loc) from None
        res = np.asarray(res, dtype=out_t.dtype)
        if res.shape != out_t.shape:
            raise AssertionError(f"internal error: {n.op} reference gave {res.shape} for %{n.name}: {n.type}")
        env[n.name] = res
    return [env[o] for o in graph.outputs]
