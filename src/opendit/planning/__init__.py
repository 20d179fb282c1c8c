"""Speeds, calibration, the cost model and the planner: pure functions of a request and hardware."""
