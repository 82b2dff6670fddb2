"""Screening: parse a call, identify the caller, evaluate the policy against the lists."""
