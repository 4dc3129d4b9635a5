"""The planner: hardware profiles, the strategy catalogue, memory and speed estimates, and Plan."""

import sys
import types

from lowmem.plan.hardware import PROFILES, HardwareProfile, detect_local, resolve_hardware
from lowmem.plan.planner import PlanError, plan, resolve_model, with_strategies
from lowmem.plan.render import render_plan
from lowmem.plan.structs import PLAN_FORMAT, Component, Decision, MemoryReport, Plan, Strategies

__all__ = [
    "PLAN_FORMAT", "PROFILES", "Component", "Decision", "HardwareProfile", "MemoryReport", "Plan", "PlanError",
    "Strategies", "detect_local", "plan", "render_plan", "resolve_hardware", "resolve_model", "with_strategies",
]


class _CallablePackage(types.ModuleType):
    """`lowmem.plan(spec)` stays the planner after this subpackage is imported.

    Importing `lowmem.plan` binds the package over the top-level `lowmem.plan` function (Python sets a
    parent's attribute to its submodule), so the package itself forwards calls to `plan`.
    """

    def __call__(self, spec, hardware=None, world_size: int = 1):
        return plan(spec, hardware, world_size)


sys.modules[__name__].__class__ = _CallablePackage
