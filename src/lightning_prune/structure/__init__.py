"""Structure layer: channel groups, physical removal, plans, optimizer transplant, FLOPs."""
from .batchnorm import recalibrate_batchnorm
from .flops import FlopsModel, ModelCost, count_flops, count_params, measure
from .graph import (
    GRAPH_OPTIONS,
    IN,
    OUT,
    ChannelGroup,
    DependencyGraph,
    GroupMember,
    SurgeryResult,
    apply_plan,
    check_graph_options,
)
from .optimizer import OptimizerSnapshot, transplant_optimizer
from .plan import PruningPlan
from .surgery import ModelSnapshot, ParameterLineage, Slicing
from .tracing import EventDeadline, preserved_state, run_bounded

__all__ = [
    "EventDeadline", "GRAPH_OPTIONS", "IN", "OUT", "ChannelGroup", "FlopsModel", "DependencyGraph", "GroupMember", "ModelCost", "ModelSnapshot", "OptimizerSnapshot",
    "ParameterLineage", "PruningPlan", "Slicing", "SurgeryResult", "apply_plan", "check_graph_options", "count_flops", "count_params",
    "measure", "preserved_state", "recalibrate_batchnorm", "run_bounded", "transplant_optimizer",
]
