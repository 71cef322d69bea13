"""The `bench` command.

May import: everything.
"""
