"""Where the policy server may load adapters from: its data directory, or Tinker.

A load request names a path the server then reads; left open, anyone holding the key (or,
before it was required, anyone on the network) could make it read any file it can open.
So a filesystem path must lie inside ``data_dir`` (where the trainer writes its
checkpoints: the shared ``/data`` volume in compose and Kubernetes) once every symlink is
resolved; a relative path is taken relative to ``data_dir``; a path holding ``..`` is
refused whatever it resolves to. ``tinker://`` paths name Tinker sampler weights, not
files, and pass unchanged.
"""

from __future__ import annotations

from pathlib import Path

from services.policy.lora import AdapterError

TINKER_SCHEME = "tinker://"
NOT_ALLOWED = "lora_path_not_allowed"
"""The error code of a path outside the data directory."""


def confine(path: str, data_dir: Path) -> str:
    """The path to load ``path`` from (resolved), or ``AdapterError`` (a 400 naming
    ``lora_path``) when it may not be loaded."""
    if path.startswith(TINKER_SCHEME):
        return path
    refused = AdapterError("lora_path must name a directory inside the policy server's data "
                           "directory (REEF_DATA_DIR), without '..', or be a tinker:// path",
                           NOT_ALLOWED, "lora_path")
    candidate = Path(path)
    if "\x00" in path or ".." in candidate.parts:
        raise refused
    root = data_dir.resolve()
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, RuntimeError):  # a symlink loop, an unreadable component
        raise refused from None
    if not resolved.is_relative_to(root):
        raise refused
    return str(resolved)
