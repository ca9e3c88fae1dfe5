"""Pipelines: a YAML file of jobs planned into a DAG and run with sticky disks wired in."""
