"""Servers a user browses: the MLflow UI with its saved view, the tracking server, the Optuna dashboard, and
the guard process that stops them.

May import: every layer below, studies and reports included.
"""
