"""Run history on this machine."""
