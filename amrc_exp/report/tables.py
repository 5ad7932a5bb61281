"""Collect a sweep's results into tables (Markdown + CSV): the paper's Tables 1-4
(`report/paper_tables.py`) and the peers' Tables 5-7 (`report/peers.py`), the frontier's Table 8 (`report/frontier.py`), from the cells of
`report/cells.py`.

    python -m amrc_exp.report.tables <sweep dir> [<sweep dir> ...] [--out DIR] [--table N]

Every `results.json` under the given directories with ``"status": "complete"`` is one run
(failed.json and unfinished jobs are ignored). Runs whose configs differ only in ``seed`` (and
where they ran) are one cell: it reports the mean ± sample std over them (`cells_frame`). Which tables are written follows the sweep's
config name (``table2_embedded`` → Table 2; read from ``multirun.yaml`` or the directory name),
or ``--table``; for other directories every table that has rows is written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterable

from amrc_exp.experiment.results import job_state
from amrc_exp.io import atomic_write_text
from amrc_exp.report import frontier, peers
from amrc_exp.report.cells import CONFIGS, DASH, Table, cells_frame, empty_frame, load_results, runs_frame
from amrc_exp.report.paper_tables import table1, table2, table3, table4

__all__ = ["BUILDERS", "DASH", "build_tables", "cells_frame", "load_results", "main", "runs_frame", "tables_for",
           "write_tables"]

BUILDERS = {1: table1, 2: table2, 3: table3, 4: table4, 5: peers.table5, 6: peers.table6, 7: peers.table7,
            8: frontier.table8}
SWEEP_TABLES = {"peers": [5, 6, 7], "frontier": [8]}  # sweep config names that are not table<N>_...


def tables_for(path: Path) -> list[int]:
    """The table(s) a sweep directory was made for, from its config name (table<N>_...)."""
    names = [path.name]
    mr = path / "multirun.yaml"
    if mr.exists():
        m = re.search(r"^\s*config_name:\s*(\S+)", mr.read_text(), re.M)
        if m:
            names.insert(0, m.group(1))
    for name in names:
        m = re.match(r"table(\d)", name)
        if m and int(m.group(1)) in BUILDERS:
            return [int(m.group(1))]
        for prefix, numbers in SWEEP_TABLES.items():
            if name.startswith(prefix):
                return numbers
    return []


def build_tables(paths: Iterable[str | Path], numbers: Iterable[int] | None = None) -> list[Table]:
    """The requested (or detected) tables from the complete runs under `paths`."""
    paths = [Path(p) for p in paths]
    runs = load_results(paths)
    CONFIGS.clear()
    CONFIGS.update({r.get("_run", r["_dir"]): r["config"] for r in runs})
    df = cells_frame(runs_frame(runs))
    if numbers is None:
        detected = sorted({n for p in paths for n in tables_for(p)})
        numbers = detected or list(BUILDERS)
        explicit = bool(detected)
    else:
        explicit = True
    out = []
    for n in numbers:
        if df.empty:
            table = Table(n, "(no complete runs)", empty_frame(), empty_frame(), [])
        else:
            table = BUILDERS[n](df)
        if explicit or len(table.markdown):
            out.append(table)
    return out


def write_tables(tables: list[Table], out: Path, header: str | None = None) -> list[Path]:
    """tableN.md and tableN.csv for each table under `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in tables:
        md = (header + "\n\n" if header else "") + t.to_markdown()
        atomic_write_text(out / f"table{t.number}.md", md)
        atomic_write_text(out / f"table{t.number}.csv", t.csv.to_csv(index=False))
        written += [out / f"table{t.number}.md", out / f"table{t.number}.csv"]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amrc_exp.report.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="sweep directories (searched recursively for results.json)")
    parser.add_argument("--out", type=Path, default=None, help="write tableN.md / tableN.csv here (default: the "
                        "first sweep directory)")
    parser.add_argument("--table", type=int, action="append", choices=sorted(BUILDERS),
                        help="which table(s) to build (default: from the sweep's config name, else all)")
    parser.add_argument("--header", default=None, help="a line of Markdown put above each table (e.g. the "
                        "command and machine)")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not Path(d).is_dir()]
    if missing:
        parser.error(f"no such directory: {', '.join(missing)}")
    out = args.out or Path(args.dirs[0])
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file: give a directory for the tableN.md / tableN.csv files")
    n_runs = len(load_results(args.dirs))
    failed, pending = _unfinished_jobs(args.dirs)
    for what, jobs in (("failed (failed.json)", failed), ("pending (no result yet)", pending)):
        if jobs:
            print(f"warning: {len(jobs)} job(s) {what} have no row: " + ", ".join(map(str, jobs[:10]))
                  + (" ..." if len(jobs) > 10 else ""), file=sys.stderr)
    if n_runs == 0:
        print(f"amrc_exp.report.tables: error: no complete results.json under {', '.join(args.dirs)}; "
              "nothing written", file=sys.stderr)
        return 2
    tables = build_tables(args.dirs, args.table)
    files = write_tables(tables, out, args.header)
    for t in tables:
        print(t.to_markdown())
    print(f"{n_runs} complete run(s); wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _unfinished_jobs(dirs: list[str]) -> tuple[list[Path], list[Path]]:
    """Job directories (those Hydra wrote a .hydra/ into) without a complete result: failed ones
    (a failed.json) and pending ones (killed, or not run yet)."""
    jobs = [d.parent for root in map(Path, dirs) for d in sorted(root.rglob(".hydra"))]
    states = {job: job_state(job) for job in jobs}
    return ([j for j in jobs if states[j] == "failed"], [j for j in jobs if states[j] == "pending"])


if __name__ == "__main__":
    # Through the imported module, not this __main__ copy: report/peers.py imports it, and its
    # module state (CONFIGS) must be the one build_tables fills.
    from amrc_exp.report.tables import main as _main

    sys.exit(_main())
