"""Hydra config groups, shipped as package data (an importable package so Hydra can load `pkg://amrc_exp.conf`)."""
