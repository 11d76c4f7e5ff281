"""Planner: cost models, measured quality tables and the joint optimiser of split settings."""
