"""Reports of a search: leaderboard, best architecture, incumbent curve, Pareto front; shared plot helpers."""

from tangle_ray.report.leaderboard import TrialRecord, pareto_front, ranked, write_report

__all__ = ["TrialRecord", "pareto_front", "ranked", "write_report"]
