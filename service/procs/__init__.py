"""Processes: one worker's server, the supervisor of several, metrics snapshots."""
