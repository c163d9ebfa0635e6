"""The memory planner (``catdpo-ray plan``): config + the model's config.json -> per-GPU and per-node
memory -> fits or not, and the smallest change that fits. Cheap to import (no transformers, no Ray)."""

from catdpo_ray.plan.memory import MemoryPlan, PlanSettings, plan_memory
from catdpo_ray.plan.planner import Hardware, PlanResult, parse_size, plan_run, preflight
from catdpo_ray.plan.report import format_plan
from catdpo_ray.plan.shapes import ModelShape, load_shape

__all__ = ["Hardware", "MemoryPlan", "ModelShape", "PlanResult", "PlanSettings", "format_plan", "load_shape",
           "parse_size", "plan_memory", "plan_run", "preflight"]
