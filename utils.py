"""Small shared helpers: errors users see, atomic files, seeds, environment facts."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

MIB = 2**20
# Set by `study --jobs N` for each run it starts: how many runs it runs at once (results.json concurrent_runs).
CONCURRENT_RUNS_VARIABLE = "WIKITEXT_STUDY_CONCURRENT_RUNS"


class ToolError(Exception):
    """A failure the user can fix; main.py prints it as one line and exits non-zero."""


class RunInterrupted(ToolError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wikitext-finetune"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes files private (0600); give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    try:  # Linux says it without changing it (changing it briefly would race with other threads)
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def make_durable(folder: Path) -> None:
    """Flush every file below `folder`, and the folders themselves, to disk, so that a power cut after this
    returns cannot leave them empty or torn; files get the mode open() would give them (some writers use 0600)."""
    mode = 0o666 & ~current_umask()
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, mode)
            fsync_path(path, os.O_RDONLY)
        fsync_path(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_null(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: strict JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite numbers become null), written atomically."""
    atomic_write_text(path, json.dumps(finite_or_null(obj), indent=2, default=str, allow_nan=False) + "\n")


def timestamp(microseconds: bool = False) -> str:
    """Local time as YYYYmmdd-HHMMSS; with `microseconds`, .ffffff after it: runs that finish within one second
    still have an order (`compare` shows the latest)."""
    return datetime.now().strftime("%Y%m%d-%H%M%S.%f" if microseconds else "%Y%m%d-%H%M%S")


def environment_info() -> dict[str, Any]:
    """Library versions and the device, so a result can be reproduced and compared fairly."""
    import datasets
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "peft": peft.__version__,
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    elif torch.backends.mps.is_available():
        info["device"] = "mps"
    return info


def peft_config_file(path: str) -> Path:
    """The PEFT config file a --peft_config or peft: arm names: the file, or a folder's adapter_config.json."""
    return Path(path) / "adapter_config.json" if Path(path).is_dir() else Path(path)


def peft_arm_name(path: str) -> str:
    """A peft: arm's name: its config's folder for a folder (or a file named adapter_config.json), else the file's
    stem."""
    file = peft_config_file(path)
    return file.parent.name if file.name == "adapter_config.json" else file.stem


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line, for error messages that must stay one line."""
    return " ".join(str(error).split()) or type(error).__name__
