"""kronopt: Kronecker-factored preconditioned optimizers for JAX and Optax."""

from kronopt.diagnostics import diagnostics
from kronopt.engine import GroupContext
from kronopt.engine import PreconditionerState
from kronopt.grafting import GraftState
from kronopt.grafting import graft
from kronopt.layout import make_layout
from kronopt.optimizers import caspr
from kronopt.optimizers import kfac
from kronopt.optimizers import kradagrad
from kronopt.optimizers import shampoo
from kronopt.optimizers import shampoo2
from kronopt.optimizers import sketchy
from kronopt.optimizers import soap
from kronopt.preconditioners.caspr import scale_by_caspr
from kronopt.preconditioners.kfac import KFACFactorState
from kronopt.preconditioners.kfac import KFACGroupState
from kronopt.preconditioners.kfac import scale_by_kfac
from kronopt.preconditioners.kfac_layers import KFACLayer
from kronopt.preconditioners.kfac_layers import KFACStats
from kronopt.preconditioners.kradagrad import KradagradGroupState
from kronopt.preconditioners.kradagrad import scale_by_kradagrad
from kronopt.preconditioners.shampoo import ShampooGroupState
from kronopt.preconditioners.shampoo import scale_by_shampoo
from kronopt.preconditioners.sketchy import SketchyGroupState
from kronopt.preconditioners.sketchy import scale_by_sketchy
from kronopt.preconditioners.soap import SoapGroupState
from kronopt.preconditioners.soap import SoapState
from kronopt.preconditioners.soap import scale_by_soap
from kronopt.sharding import state_shardings

__version__ = "0.1.0"

__all__ = [
    "GraftState",
    "GroupContext",
    "KFACFactorState",
    "KFACGroupState",
    "KFACLayer",
    "KFACStats",
    "KradagradGroupState",
    "PreconditionerState",
    "ShampooGroupState",
    "SketchyGroupState",
    "SoapGroupState",
    "SoapState",
    "caspr",
    "diagnostics",
    "graft",
    "kfac",
    "kradagrad",
    "make_layout",
    "scale_by_caspr",
    "scale_by_kfac",
    "scale_by_kradagrad",
    "scale_by_shampoo",
    "scale_by_sketchy",
    "scale_by_soap",
    "shampoo",
    "shampoo2",
    "sketchy",
    "soap",
    "state_shardings",
]
