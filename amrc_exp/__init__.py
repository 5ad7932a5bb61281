"""amrc_exp: activation-aware mixed-rank compression of Vision Transformers.

Three layers, imports pointing down only:

* `amrc_exp.compress` (+ `amrc_exp.math`): the library; torch only, callable from a notebook.
* `amrc_exp.experiment`: Hydra configs, W&B, files; `python -m amrc_exp` / `amrc`.
* `amrc_exp.report`: paper tables, figures, benchmarks.
"""

from importlib.util import find_spec
from pathlib import Path

# The repository's top-level conf/ and notebooks/ are mapped into the package at build time
# (pyproject.toml): installed they are amrc_exp/conf and amrc_exp/notebooks, in an editable
# install the checkout's own folders. Either way the two are siblings, so one lookup finds both.
CONF_DIR = Path(find_spec("amrc_exp.conf").origin).resolve().parent  # Hydra's primary config dir
NOTEBOOK_DIR = CONF_DIR.parent / "notebooks"
