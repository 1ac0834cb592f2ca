"""Scaling experiments: a grid of short training runs with predicted and measured throughput and memory."""
