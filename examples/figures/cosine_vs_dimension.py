"""Draw the paper's cosine vs dimension figure: `python examples/figures/cosine_vs_dimension.py [out.png]`.

Thin wrapper over :func:`lightning_gradsim.experiments.figures.cosine_vs_dimension` (see its docstring).
"""

import sys

from lightning_gradsim.experiments.figures import cosine_vs_dimension

if __name__ == "__main__":
    print(cosine_vs_dimension(sys.argv[1] if len(sys.argv) > 1 else "figures/cosine_vs_dimension.png"))
