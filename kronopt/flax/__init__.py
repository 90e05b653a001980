"""K-FAC statistics capture for Flax: :mod:`kronopt.flax.nnx`, :mod:`.linen`.

Importing this package imports Flax; ``import kronopt`` does not.
"""

from kronopt.flax import linen
from kronopt.flax import nnx
