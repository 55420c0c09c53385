"""Time and peak RSS of `rlhf-tui analyze-checkpoint` on each checkpoint bomb (issue 16): run from the repo root,
`python benchmarks/checkpoint_bombs.py`. Builds the bombs of tests/functional/test_checkpoint_bombs.py in a
temporary folder and prints one row per bomb: exit code, wall seconds, max RSS of the CLI, its stderr line."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "functional"))

from test_checkpoint_bombs import BOMBS, run_measured


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'bomb':<28} {'bytes':>10} {'rc':>3} {'wall s':>7} {'max RSS MB':>10}  stderr")
        for kind, (make, _) in BOMBS.items():
            folder = Path(tmp) / kind
            folder.mkdir()
            path = make(folder)
            rc, err, wall, rss = run_measured("analyze-checkpoint", path)
            line = (err.strip().splitlines() or [""])[0].replace(path, "BOMB")
            print(f"{kind:<28} {os.path.getsize(path):>10} {rc:>3} {wall:>7.2f} {rss:>10.0f}  {line[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
