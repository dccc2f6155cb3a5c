"""PCGrad (Yu et al., 2020): a gate rule, now in :mod:`lightning_gradsim.rules.pcgrad`; kept importable here.

>>> from lightning_gradsim.baselines.pcgrad import PCGrad
>>> PCGrad.name
'pcgrad'
"""

from ..rules.pcgrad import PCGrad, draw_pcgrad_orders, pcgrad_coefficients

__all__ = ["PCGrad", "pcgrad_coefficients", "draw_pcgrad_orders"]
