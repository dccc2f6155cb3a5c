"""Draw the paper's proposition3 figure: `python examples/figures/proposition3.py [out.png]`.

Thin wrapper over :func:`lightning_gradsim.experiments.figures.proposition3` (see its docstring).
"""

import sys

from lightning_gradsim.experiments.figures import proposition3

if __name__ == "__main__":
    print(proposition3(sys.argv[1] if len(sys.argv) > 1 else "figures/proposition3.png"))
