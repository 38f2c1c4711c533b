"""Sweeps: the summary a multirun leaves at its root (table and plots), and the number a sweeper optimises."""
