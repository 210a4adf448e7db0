"""Run the fuzz targets of :mod:`gateway.bench.fuzz_targets`, bounded in time.

Command (``bench/fuzz.py`` is the same)::

    python bench/fuzz.py TARGET|all [--minutes N | --seconds N] [--out DIR] [--engine atheris|random]
    python bench/fuzz.py --list
    python bench/fuzz.py replay TARGET FILE...     # run saved inputs through the contract

Two engines:

``atheris`` (default when installed: ``pip install -e '.[fuzz]'``)
    coverage-guided, libFuzzer under the hood. Each target runs in a worker process; the
    target's own source files are instrumented (so ``cov``/``ft`` count edges of the
    parser, not of the standard library). A crash stops libFuzzer: the worker is started
    again on the same corpus until the time is used (at most 20 restarts), and each crash
    file is replayed to tell distinct crashes apart. ``-timeout`` is the per-input hang limit.
``random``
    no dependency: mutations of the seeds (bit flips, interesting octets, inserts, deletes,
    splices) in this process, a per-input SIGALRM limit. No coverage feedback; it is what
    the test suite runs when atheris is missing, so CI exercises every target's contract.

After an atheris run the final corpus is replayed under coverage.py (when installed) for
the line coverage of the target's sources. Crashing inputs go to ``OUT/TARGET/crashes``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import json
import logging
import random
import re
import signal
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gateway.bench.fuzz_targets import ROOT, TARGETS, Harness, Target

__all__ = ["RunResult", "main", "random_fuzz", "replay", "run_target"]

MAX_RESTARTS = 20


@dataclasses.dataclass
class RunResult:
    """What one target's run found; ``crashes`` maps a signature to one input file."""

    target: str
    engine: str
    seconds: float = 0.0
    executions: int = 0
    cov: int | None = None
    ft: int | None = None
    corpus: int | None = None
    line_coverage: dict[str, str] = dataclasses.field(default_factory=dict)
    crashes: dict[str, str] = dataclasses.field(default_factory=dict)
    hangs: dict[str, str] = dataclasses.field(default_factory=dict)
    restarts: int = 0

    def summary(self) -> str:
        cov = f"cov {self.cov} ft {self.ft} corpus {self.corpus}" if self.cov is not None else "cov n/a (random engine)"
        lines = ", ".join(f"{Path(k).name} {v}" for k, v in self.line_coverage.items()) or "n/a"
        return (
            f"{self.target}: {self.engine}, {self.seconds:.0f} s, {self.executions} executions "
            f"({self.executions / max(self.seconds, 1e-9):.0f}/s), {cov}, line coverage {lines}, "
            f"{len(self.crashes)} crash(es), {len(self.hangs)} hang(s)"
        )


class Hang(BaseException):
    """Raised by the per-input alarm (a BaseException, so no ``except Exception`` eats it)."""


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: types.FrameType | None) -> None:
        raise Hang(f"input took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)  # an outer alarm (pytest-timeout) ...
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer > 0:  # ... is given back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3), interval)


def signature(exc: BaseException) -> str:
    """Exception type and the innermost frame inside the repository: one name per bug."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(ROOT))]
    where = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


def _save(directory: Path, data: bytes, prefix: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{prefix}-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------ random engine


_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x68, 0x7E, 0x22, 0x5B, 0x7B, 0x3C, 0x0A)


def mutate(data: bytes, seeds: Sequence[bytes], rng: random.Random, max_len: int) -> bytes:
    """One to eight random edits of ``data`` (libFuzzer's simplest mutators)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice(_INTERESTING)
        elif op == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and buf:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 32)]
        elif op == 5:
            other = rng.choice(seeds)
            if other:
                start = rng.randrange(len(other))
                buf[pos:] = other[start : start + rng.randint(1, 256)]
        elif buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
    return bytes(buf[:max_len])


@contextmanager
def _quiet() -> Iterator[None]:
    """The parsers log each rejected input (as they should): millions of lines here."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def random_fuzz(target: Target, seconds: float, out: Path | None = None, *, seed: int = 0) -> RunResult:
    """Mutation fuzzing without coverage feedback, in this process."""
    with _quiet():
        return _random_fuzz(target, seconds, out, seed)


def _random_fuzz(target: Target, seconds: float, out: Path | None, seed: int) -> RunResult:
    with target.make() as one:
        return _mutate_loop(target, one, seconds, out, seed)


def _mutate_loop(target: Target, one: Harness, seconds: float, out: Path | None, seed: int) -> RunResult:
    seeds = target.seeds()
    rng = random.Random(seed)
    result = RunResult(target.name, "random")
    start = time.monotonic()
    queue = list(seeds)
    while time.monotonic() - start < seconds:
        data = queue[result.executions] if result.executions < len(queue) else mutate(
            rng.choice(seeds), seeds, rng, target.max_len
        )
        result.executions += 1
        try:
            with _alarm(target.timeout_s):
                one(data)
        except Hang:
            sig = f"hang in {target.name}"
            if sig not in result.hangs:
                result.hangs[sig] = str(_save(out, data, "timeout")) if out else data.hex()
        except Exception as exc:  # the contract: anything that comes out is a crash
            sig = signature(exc)
            if sig not in result.crashes:
                result.crashes[sig] = str(_save(out, data, "crash")) if out else data.hex()
    result.seconds = time.monotonic() - start
    return result


# ----------------------------------------------------------------------------- atheris engine


def atheris_available() -> bool:
    return importlib.util.find_spec("atheris") is not None


def _instrument(sources: Sequence[str]) -> int:
    """Instrument every function whose code comes from one of ``sources`` (already imported).

    Why not ``atheris.instrument_imports``: the target's modules are imported by the seed
    builders before the worker gets here; instrumenting the live function objects (as
    ``atheris.instrument_all`` does, but only for these files) works whatever imported them.
    """
    import atheris

    files = {str(ROOT / s) for s in sources}
    n = 0
    for obj in gc.get_objects():
        code = getattr(obj, "__code__", None)
        if isinstance(obj, types.FunctionType) and isinstance(code, types.CodeType) and code.co_filename in files:
            atheris.instrument_func(obj)
            n += 1
    return n


def _worker(argv: list[str]) -> None:
    """``python -m gateway.bench.fuzz worker TARGET CORPUS CRASHES SECONDS [libFuzzer flags]``."""
    import atheris

    logging.disable(logging.CRITICAL)
    name, corpus, crashes, seconds, *flags = argv
    target = TARGETS[name]
    seed_dir = Path(corpus).parent / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    for data in target.seeds():  # made here: run-time keys of the seeds are this process's
        _save(seed_dir, data, "seed")
    one = target.make()
    print(f"INFO: instrumented {_instrument(target.sources)} functions of {', '.join(target.sources)}", flush=True)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            f"-timeout={target.timeout_s}",
            f"-max_len={target.max_len}",
            f"-artifact_prefix={crashes}/",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            *flags,
            corpus,
            str(seed_dir),
        ],
        one,
    )
    atheris.Fuzz()


_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)")


def run_target(
    target: Target, seconds: float, out: Path, *, engine: str = "auto", echo: Callable[[str], None] = print
) -> RunResult:
    """Fuzz one target for ``seconds``; crashes and hangs land in ``out/TARGET/crashes``."""
    work = out / target.name
    crashes = work / "crashes"
    if engine == "auto":
        engine = "atheris" if atheris_available() else "random"
    if engine == "random":
        result = random_fuzz(target, seconds, crashes)
        echo(result.summary())
        return result
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    result = RunResult(target.name, "atheris")
    start = time.monotonic()
    known: set[Path] = set(crashes.iterdir())
    log = (work / "fuzz.log").open("a", encoding="utf-8")
    try:
        while result.restarts <= MAX_RESTARTS:
            left = int(seconds - (time.monotonic() - start))
            if left < 1:
                break
            cmd = [sys.executable, "-m", "gateway.bench.fuzz", "worker", target.name]
            cmd += [str(corpus), str(crashes), str(left)]
            last_units = 0
            with subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
            ) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if m := _STATUS.match(line):
                        last_units = int(m[1])
                        result.cov, result.ft, result.corpus = int(m[3]), int(m[4]), int(m[5])
                        if m[2] in ("pulse", "DONE", "INITED"):
                            echo(f"  {target.name}: {line.rstrip()}")
                    elif m := _EXECUTED.match(line):
                        last_units = int(m[1])
                    elif line.startswith(("=== Uncaught Python exception", "ALARM:", "==", "SUMMARY:")):
                        echo(f"  {target.name}: {line.rstrip()}")
            result.executions += last_units
            new = set(crashes.iterdir()) - known
            known |= new
            for path in sorted(new):
                kind, sig = _classify(target, path)
                (result.hangs if kind == "hang" else result.crashes).setdefault(sig, str(path))
                echo(f"  {target.name}: {kind} {sig} -> {path}")
            if proc.returncode == 0 or not new:
                break  # time used up (or the worker failed without an input to blame)
            result.restarts += 1
    finally:
        log.close()
    result.seconds = time.monotonic() - start
    result.line_coverage = line_coverage(target, [corpus, work / "seeds"])
    echo(result.summary())
    return result


def _classify(target: Target, path: Path) -> tuple[str, str]:
    """("crash" | "hang", signature) of a libFuzzer artifact, by replaying it here."""
    if path.name.startswith(("timeout-", "slow-unit-")):
        return "hang", f"hang ({path.name.split('-')[0]})"
    if path.name.startswith("oom-"):
        return "crash", "out of memory"
    problems = replay(target, [path])
    return "crash", problems[0][1] if problems else "crash that does not reproduce in one replay"


def replay(target: Target, paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Run saved inputs through the target; (file, signature) of each that breaks the contract."""
    with _quiet():
        return _replay(target, paths)


def _replay(target: Target, paths: Sequence[Path]) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    with target.make() as one:
        for p in paths:
            try:
                with _alarm(max(target.timeout_s, 5)):
                    one(p.read_bytes())
            except Hang:
                out.append((p, "hang"))
            except Exception as exc:
                out.append((p, signature(exc)))
    return out


def line_coverage(target: Target, dirs: Sequence[Path]) -> dict[str, str]:
    """Lines of the target's sources run by the corpus, with coverage.py (if installed)."""
    if importlib.util.find_spec("coverage") is None:
        return {}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.bench.fuzz", "coverage", target.name, *map(str, dirs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    try:
        figures: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": proc.stderr.strip()[-200:]}
    return figures


def _coverage_worker(argv: list[str]) -> None:
    import coverage

    logging.disable(logging.CRITICAL)
    name, *dirs = argv
    target = TARGETS[name]
    files = [str(ROOT / s) for s in target.sources]
    cov = coverage.Coverage(include=files, data_file=None, branch=False)
    cov.start()
    with target.make() as one:
        for d in dirs:
            for p in sorted(Path(d).glob("*")) if Path(d).is_dir() else []:
                try:
                    with _alarm(max(target.timeout_s, 5)):
                        one(p.read_bytes())
                except BaseException:
                    pass
    cov.stop()
    figures: dict[str, str] = {}
    for f in files:
        _, statements, _, missing, _ = cov.analysis2(f)
        run = len(statements) - len(missing)
        share = 100 * run / max(len(statements), 1)
        figures[str(Path(f).relative_to(ROOT))] = f"{run}/{len(statements)} ({share:.0f}%)"
    print(json.dumps(figures))


# ------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        _worker(args[1:])
        return 0
    if args[:1] == ["coverage"]:
        _coverage_worker(args[1:])
        return 0
    if args[:1] == ["replay"]:
        target = TARGETS[args[1]]
        problems = replay(target, [Path(a) for a in args[2:]])
        for path, sig in problems:
            print(f"{path}: {sig}")
        print(f"{len(args) - 2 - len(problems)} of {len(args) - 2} input(s) within the contract")
        return 1 if problems else 0
    p = argparse.ArgumentParser(
        prog="bench/fuzz.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("target", nargs="?", choices=[*TARGETS, "all"])
    p.add_argument("--minutes", type=float, default=None, help="per target (default 1)")
    p.add_argument("--seconds", type=float, default=None, help="per target, instead of --minutes")
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "fuzz")
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--list", action="store_true", help="list the targets")
    ns = p.parse_args(args)
    if ns.list or ns.target is None:
        for t in TARGETS.values():
            print(f"{t.name:12} {t.what}")
        return 0
    seconds = ns.seconds if ns.seconds is not None else 60.0 * (ns.minutes if ns.minutes is not None else 1.0)
    names = list(TARGETS) if ns.target == "all" else [ns.target]
    results: list[RunResult] = []
    for name in names:
        print(f"fuzzing {name} for {seconds:.0f} s ({TARGETS[name].what})", flush=True)
        echo = lambda s: print(s, flush=True)  # noqa: E731
        results.append(run_target(TARGETS[name], seconds, ns.out, engine=ns.engine, echo=echo))
    print()
    for r in results:
        if len(results) > 1:
            print(r.summary())
        for sig, where in {**r.crashes, **r.hangs}.items():
            print(f"    {sig}: {where}")
    if ns.json is not None:
        ns.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")
    return 1 if any(r.crashes or r.hangs for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
