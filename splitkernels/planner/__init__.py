"""Planner: cost models, measured quality tables and the joint optimiser of split settings.

Typical use: ``table = QualityTable.load(path)`` (or :func:`calibrate`), a :class:`Scenario` with
compute models for each side (:class:`Roofline` over a shipped :func:`get_device`, or a measured
:class:`~splitkernels.planner.profile.Profile`), then ``plan(scenario, table, Limits(...)).plan``
-- a :class:`Plan` whose ``apply(model)`` returns the runtime's ``SplitModel``.
"""
from .costs import Link, ModelShape, Roofline, memory, split_latency
from .devices import Device, devices, get_device
from .optimizer import Infeasible, Limits, Plan, PlanResult, Scenario, plan
from .quality import QualityPoint, QualityTable, SplitEvaluator, calibrate

__all__ = [
    "Link", "ModelShape", "Roofline", "memory", "split_latency", "Device", "devices", "get_device", "Infeasible",
    "Limits", "Plan", "PlanResult", "Scenario", "plan", "QualityPoint", "QualityTable", "SplitEvaluator",
    "calibrate",
]
