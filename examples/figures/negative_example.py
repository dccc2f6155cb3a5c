"""Draw the paper's negative example figure: `python examples/figures/negative_example.py [out.png]`.

Thin wrapper over :func:`lightning_gradsim.experiments.figures.negative_example` (see its docstring).
"""

import sys

from lightning_gradsim.experiments.figures import negative_example

if __name__ == "__main__":
    print(negative_example(sys.argv[1] if len(sys.argv) > 1 else "figures/negative_example.png"))
