"""Prefect tasks: thin adapters between the artifact store and stitchtime_core."""
