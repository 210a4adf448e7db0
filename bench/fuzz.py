"""Fuzz every parser that takes bytes or text from outside, each for a bounded time.

Run:  python bench/fuzz.py TARGET|all [--minutes N] [--out bench-out/fuzz] [--engine atheris|random]
      python bench/fuzz.py --list
      python bench/fuzz.py replay TARGET FILE...

Targets, contracts and engines: gateway/bench/fuzz_targets.py and gateway/bench/fuzz.py;
figures of the reference runs: docs/fuzzing.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.bench.fuzz import main

if __name__ == "__main__":
    sys.exit(main())
