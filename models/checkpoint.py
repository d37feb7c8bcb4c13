"""Checkpoints: one safetensors file holding the model weights, the optimizer state and (in
its metadata) the config, step and anything else JSON-serialisable.

Written atomically: a temporary file in the same directory, fsync, then ``os.replace``, so
a crash mid-save leaves the previous checkpoint intact; the file gets the permissions a
newly created file gets (0666 less the umask), not the temporary file's 0600.  The metadata
holds a CRC-32 of every tensor's name, dtype, shape and bytes (in name order) and one of
the rest of the metadata: a flipped bit in the data or a changed step count, which
safetensors alone would load silently, is refused.  Loading checks every
name, shape and dtype against the model and optimizer and refuses a corrupt or mismatched
file with an error that names the path; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Any

import numpy as np

FORMAT = "neural_arch-checkpoint-1"


class CheckpointError(ValueError):
    pass


def _optimizer_tensors(optimizer, model) -> dict[str, np.ndarray]:
    out = {}
    if optimizer is None:
        return out
    names = {id(p): n for n, p in model.named_parameters()}
    for p in optimizer.params:
        st = optimizer.state_for(p)
        for k, v in st.items():
            if k != "step":
                out[f"optim.{names[id(p)]}.{k}"] = np.ascontiguousarray(v.data)
    return out


def tensors_crc32(tensors: dict[str, np.ndarray]) -> str:
    """CRC-32 of the tensors' names, dtypes, shapes and bytes, in name order (hex)."""
    crc = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        crc = zlib.crc32(f"{name}:{a.dtype.str}:{list(a.shape)};".encode(), crc)
        crc = zlib.crc32(memoryview(a).cast("B"), crc)
    return f"{crc:08x}"


def metadata_crc32(meta: dict) -> str:
    """CRC-32 of the metadata's canonical JSON (sorted keys), without its own entry (hex)."""
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_crc32"}, sort_keys=True)
    return f"{zlib.crc32(body.encode()):08x}"


def _umask() -> int:
    """The process's umask, without changing it (Linux: /proc; elsewhere set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save(path: str, model, optimizer=None, step: int = 0, config: Any = None, extra: dict | None = None) -> str:
    from safetensors.numpy import save as st_save
    tensors = {f"model.{k}": np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    tensors.update(_optimizer_tensors(optimizer, model))
    meta = {"format": FORMAT, "step": int(step), "extra": extra or {}, "crc32": tensors_crc32(tensors)}
    if config is not None:
        meta["config"] = config if isinstance(config, dict) else dict(vars(config))
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        meta["optimizer"] = {"type": type(optimizer).__name__, "lr": optimizer.lr,
                             "step_count": optimizer.step_count,
                             "steps": {names[id(p)]: optimizer.state_for(p)["step"] for p in optimizer.params}}
    meta["meta_crc32"] = metadata_crc32(meta)
    blob = st_save(tensors, metadata={"neural_arch": json.dumps(meta)})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # (mkstemp makes it 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def read(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of a checkpoint file, or CheckpointError naming the path."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        tensors = st_load(blob)
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            raw = (f.metadata() or {}).get("neural_arch")
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a neural_arch checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if "meta_crc32" in meta and metadata_crc32(meta) != meta["meta_crc32"]:  # (older files had none)
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata (step, learning rate, config, ...) does "
                              f"not match the CRC-32 saved with it (it was changed after it was written)")
    if "crc32" in meta and tensors_crc32(tensors) != meta["crc32"]:  # (files written before it had none)
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match the CRC-32 saved with "
                              f"them (the data was changed after it was written)")
    return tensors, meta


def load(path: str, model, optimizer=None) -> dict:
    """Load weights (and optimizer state) in place; returns the metadata (step, config, extra)."""
    from neural_arch.compiler.tensor import Tensor
    tensors, meta = read(path)
    own = model.state_dict()
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    problems = []
    for k, v in own.items():
        if k not in weights:
            problems.append(f"missing {k}")
        elif weights[k].shape != v.shape or weights[k].dtype != v.dtype:
            problems.append(f"{k}: file {weights[k].dtype}{list(weights[k].shape)} vs model {v.dtype}{list(v.shape)}")
    problems += [f"unexpected {k}" for k in weights if k not in own]
    if optimizer is not None:
        if "optimizer" not in meta:
            problems.append("no optimizer state in the file")
        elif meta["optimizer"]["type"] != type(optimizer).__name__:
            problems.append(f"optimizer is {meta['optimizer']['type']} in the file, {type(optimizer).__name__} here")
        else:
            expected = _optimizer_tensors(optimizer, model)
            for k, v in expected.items():
                if k not in tensors or tensors[k].shape != v.shape or tensors[k].dtype != v.dtype:
                    problems.append(f"optimizer state {k} missing or mismatched")
            # (state this optimizer does not keep: SGD's momentum buffers in an SGD without momentum)
            extra_state = sorted(k for k in tensors if k.startswith("optim.") and k not in expected)
            if extra_state:
                problems.append("unexpected optimizer state " + ", ".join(extra_state))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))
    model.load_state_dict(weights)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer.lr = meta["optimizer"]["lr"]
        optimizer.step_count = meta["optimizer"]["step_count"]
        for p in optimizer.params:
            st = optimizer.state_for(p)
            for k in list(st):
                if k == "step":
                    st[k] = int(meta["optimizer"]["steps"][names[id(p)]])
                else:
                    st[k] = Tensor(tensors[f"optim.{names[id(p)]}.{k}"])
    return meta
