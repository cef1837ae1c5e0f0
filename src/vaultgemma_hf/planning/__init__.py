"""DP budget planner: privacy x compute x utility trade-off of DP-SGD training (``vaultgemma-hf plan``).

Quick use::

    from vaultgemma_hf.planning import plan_budget, save_plan, load_plan

    plan = plan_budget(target_epsilon=8, dataset_size=1_000_000, flops=1e20)
    print(plan.explanation)
    save_plan(plan, "plan.json")
    config = load_plan("plan.json")  # the recommended row, as DPTrainingArguments(--plan) reads it
"""

from vaultgemma_hf.dp.accounting import default_delta  # one default for planner and trainer
from vaultgemma_hf.planning.budget import (
    ANCHOR_STEP_SECONDS,
    ANCHOR_STEP_TOKENS,
    DEFAULT_MIN_STEPS,
    DEFAULT_THROUGHPUT,
    GridPoint,
    build_grid,
    default_throughput,
    flops_budget,
    pareto_frontier,
    recommend,
    training_flops,
)
from vaultgemma_hf.planning.dataset import count_sequences
from vaultgemma_hf.planning.io import TRAINER_FIELDS, load_plan, plan_to_json, plot_plan, save_plan
from vaultgemma_hf.planning.model_size import VAULTGEMMA_1B_PARAMETERS, count_parameters, load_model_config
from vaultgemma_hf.planning.planner import PLAN_FORMAT, PLAN_FORMAT_VERSION, Plan, PlanRow, calibrate_grid, plan_budget

__all__ = [
    "ANCHOR_STEP_SECONDS",
    "ANCHOR_STEP_TOKENS",
    "DEFAULT_MIN_STEPS",
    "DEFAULT_THROUGHPUT",
    "PLAN_FORMAT",
    "PLAN_FORMAT_VERSION",
    "TRAINER_FIELDS",
    "VAULTGEMMA_1B_PARAMETERS",
    "GridPoint",
    "Plan",
    "PlanRow",
    "build_grid",
    "calibrate_grid",
    "count_parameters",
    "count_sequences",
    "default_delta",
    "default_throughput",
    "flops_budget",
    "load_model_config",
    "load_plan",
    "pareto_frontier",
    "plan_budget",
    "plan_to_json",
    "plot_plan",
    "recommend",
    "save_plan",
    "training_flops",
]
