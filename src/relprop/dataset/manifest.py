"""What a run is (run.json) and what it produced (manifest.json).

run.json is written before the first shard: model name and a fingerprint of its weights,
the composite with every parameter, target, storage, shard size and the dataset. A later
run into the same folder must match it, or it would mix two kinds of explanation. Every
shard carries the run's id too, so a shard from another run is never taken as done.
manifest.json is written last, by rank 0: one row per sample (shard and offset).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import RelpropError
from .shards import write_atomic

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
FORMAT = 1
# what must be equal for two runs to share a folder (relprop_version is recorded only)
RUN_KEYS = ("format", "model", "model_fingerprint", "composite", "params", "target", "store",
            "dtype", "shard_size", "num_samples", "data_fingerprint")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(paths: list[str] | None) -> str | None:
    """sha256 of the sample paths (None for datasets without paths: their length counts)."""
    if not paths:
        return None
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def jsonable(value: Any) -> Any:
    """Composite parameters as exact JSON (tensors as nested lists)."""
    if isinstance(value, Tensor):
        return {"tensor": value.detach().cpu().double().tolist(), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(value)


def run_id(config: dict[str, Any]) -> str:
    key = {k: config.get(k) for k in RUN_KEYS}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_run(folder: Path, config: dict[str, Any]) -> None:
    """Refuse a folder that holds another run's shards (different model, composite, ...)."""
    path = folder / RUN_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RelpropError(f"cannot read {path}: {exc}; delete it (and the shards beside "
                           "it) or choose another output folder") from exc
    diffs = [_difference(k, old.get(k), config.get(k)) for k in RUN_KEYS
             if old.get(k) != config.get(k)]
    if diffs:
        raise RelpropError(f"{folder} holds explanations of another run, which this one "
                           f"would mix with: {'; '.join(diffs)}. Use another output folder, "
                           "or delete that one to start afresh")


def _difference(key: str, old: Any, new: Any) -> str:
    if key == "model_fingerprint":
        return f"model weights differ (fingerprint {str(old)[:12]} then, {str(new)[:12]} now)"
    if key == "composite" and isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return (f"composite {old.get('name')!r} then, {new.get('name')!r} now "
                f"(differs in {', '.join(changed)})")
    if key == "params":
        return f"composite parameters {_short(old)} then, {_short(new)} now"
    if key == "data_fingerprint":
        return "the dataset's files differ"
    return f"{key} {_short(old)} then, {_short(new)} now"


def _short(value: Any, n: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= n else text[:n - 3] + "..."


def write_run(folder: Path, config: dict[str, Any]) -> None:
    write_atomic(folder / RUN_FILE, json.dumps(config, indent=1, sort_keys=True).encode())


def write_manifest(folder: Path, config: dict[str, Any], rows: list[dict[str, Any]],
                   extra: dict[str, Any]) -> Path:
    """manifest.json: the run, then one row per sample in dataset order."""
    rows = sorted(rows, key=lambda r: r["index"])
    shards = sorted({r["shard"] for r in rows})
    manifest = {**config, **extra, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "num_shards": len(shards), "samples": rows}
    path = folder / MANIFEST_FILE
    write_atomic(path, json.dumps(manifest, separators=(",", ":")).encode())
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        hint = (" (a run was started there but has not finished: run it again to complete it)"
                if (Path(folder) / RUN_FILE).exists() else "")
        raise RelpropError(f"no {MANIFEST_FILE} in {folder}{hint}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RelpropError(f"cannot read {path}: {exc}") from exc
