"""Where things live: the project's own files and the cache that built-in models are built into."""

import os
import shutil
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"
TEMPLATES_DIR = PROJECT_ROOT / "templates"


def cache_root() -> Path:
    """$MEDLORA_CACHE, default ~/.cache/medlora."""
    return Path(os.environ.get("MEDLORA_CACHE", Path.home() / ".cache" / "medlora")).expanduser()


def build_once(target: Path, build) -> Path:
    """`target`, after `build(folder)` has filled it, unless a finished copy is already there.

    The build runs in a staging folder that is renamed into place, so an interrupted build never
    looks finished, and two processes building at once both end with the same complete folder."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
