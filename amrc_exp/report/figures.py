"""`python -m amrc_exp.report.figures`: execute notebooks/figures.ipynb (amrc_exp/notebooks/ when installed) headless (nbclient), save
Fig 1-5 as PNG and the executed notebook beside them (figures.ipynb, outputs included), without
Jupyter installed.

    python -m amrc_exp.report.figures --fig-dir results/figures \\
        [--sweep-dirs outputs/sweeps/table2_embedded] [--fig2-dirs outputs/sweeps/fig2_embedded] \\
        [--peers-dirs outputs/sweeps/peers_embedded] \\
        [--frontier-dirs outputs/sweeps/frontier_embedded outputs/sweeps/frontier_dense_embedded]

The notebook reads the same inputs from AMRC_SWEEP_DIRS / AMRC_FIG2_DIRS / AMRC_PEERS_DIRS /
AMRC_FRONTIER_DIRS / AMRC_FIG_DIR. Needs the dev extras (nbclient, nbformat, ipykernel), which scripts/setup.sh installs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from amrc_exp import NOTEBOOK_DIR

NOTEBOOK = NOTEBOOK_DIR / "figures.ipynb"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amrc_exp.report.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fig-dir", type=Path, default=Path("figures"))
    parser.add_argument("--sweep-dirs", nargs="*", type=Path, default=None)
    parser.add_argument("--fig2-dirs", nargs="*", type=Path, default=None)
    parser.add_argument("--peers-dirs", nargs="*", type=Path, default=None)
    parser.add_argument("--frontier-dirs", nargs="*", type=Path, default=None)
    args = parser.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient

    env = {"AMRC_FIG_DIR": str(args.fig_dir.resolve()), "AMRC_ROOT": str(Path.cwd())}
    for key, dirs in (("AMRC_SWEEP_DIRS", args.sweep_dirs), ("AMRC_FIG2_DIRS", args.fig2_dirs),
                      ("AMRC_PEERS_DIRS", args.peers_dirs), ("AMRC_FRONTIER_DIRS", args.frontier_dirs)):
        if dirs:
            env[key] = os.pathsep.join(str(d.resolve()) for d in dirs)
    os.environ.update(env)  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    executed = args.fig_dir / NOTEBOOK.name  # the record of what made the PNGs, outputs included
    nbformat.write(nb, executed)
    pngs = sorted(p.name for p in args.fig_dir.glob("*.png"))
    print(f"executed {NOTEBOOK} into {executed}; figures in {args.fig_dir}: {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
