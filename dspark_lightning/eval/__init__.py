"""Evaluation on benchmark suites: prompts, torchmetrics counters, the validate hook, reports and plots."""
