"""tdd_fx: find hand-written time-distributed dense layers in PyTorch models and replace each
with one canonical, verified node.

    opt = tdd_fx.optimize(model, example_inputs)   # a verified, trainable module
    print(opt.tdd_report)                          # what changed
    print(tdd_fx.audit(model, example_inputs))     # what would change, and near-misses
"""

from .api import audit, optimize
from .capture import CaptureError
from .ops import GuardError, TimeDistributed, time_distributed_dense
from .program import graph_of, graphs
from .report import Report, Site

__all__ = [
    "CaptureError",
    "GuardError",
    "Report",
    "Site",
    "TimeDistributed",
    "audit",
    "graph_of",
    "graphs",
    "optimize",
    "time_distributed_dense",
]
__version__ = "0.2.0"
