"""Baseline campaigns: methods x seeds as stages on Ray, with the paper's statistics."""
