"""Sweeps to runs: spec validation, grid expansion, run identity, run directories and executors.

Torch-free by rule: planning, status and collect must stay fast and light.
"""
