"""Where the benchmark prompt sets live: ``shared/data`` beside the checkout, read at run time.

A clone made elsewhere (CI clones into a temporary directory) finds it beside the repository it
was cloned from; ``GAD_SHARED_DATA`` names it explicitly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The first of: $GAD_SHARED_DATA, ../shared/data, ../shared/data beside the clone's origin."""
    candidates = [Path(p) for p in [os.environ.get("GAD_SHARED_DATA")] if p] + [ROOT.parent / "shared" / "data"]
    origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "data")
    for path in candidates:
        if (path / "vicuna80.jsonl").is_file():
            return path
    return candidates[0]
