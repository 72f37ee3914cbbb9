"""Adapters, prompts and scaling vectors: methods that add small modules or inputs at named
sites of a frozen model (IA³, prompt / prefix / P-tuning), through :mod:`research.sites`."""
