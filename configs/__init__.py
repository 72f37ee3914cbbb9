"""Experiment configs as code: each file has ``get_config(arg)`` returning a ConfigDict."""
