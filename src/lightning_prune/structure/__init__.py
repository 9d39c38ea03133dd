"""Structure layer: channel groups, physical removal, plans, optimizer transplant, FLOPs."""
from .batchnorm import recalibrate_batchnorm
from .flops import FlopsModel, ModelCost, count_flops, count_params, measure
from .graph import IN, OUT, ChannelGroup, DependencyGraph, GroupMember, SurgeryResult, apply_plan
from .optimizer import OptimizerSnapshot, transplant_optimizer
from .plan import PruningPlan
from .surgery import ModelSnapshot, ParameterLineage, Slicing
from .tracing import preserved_state, run_bounded

__all__ = [
    "IN", "OUT", "ChannelGroup", "FlopsModel", "DependencyGraph", "GroupMember", "ModelCost", "ModelSnapshot", "OptimizerSnapshot",
    "ParameterLineage", "PruningPlan", "Slicing", "SurgeryResult", "apply_plan", "count_flops", "count_params",
    "measure", "preserved_state", "recalibrate_batchnorm", "run_bounded", "transplant_optimizer",
]
