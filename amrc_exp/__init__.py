"""amrc_exp: activation-aware mixed-rank compression of Vision Transformers.

Three layers, imports pointing down only:

* `amrc_exp.compress` (+ `amrc_exp.math`): the library; torch only, callable from a notebook.
* `amrc_exp.experiment`: Hydra configs, W&B, files; `python -m amrc_exp` / `amrc`.
* `amrc_exp.report`: paper tables, figures, benchmarks.
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"  # Hydra's primary config dir (package data)
NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"
