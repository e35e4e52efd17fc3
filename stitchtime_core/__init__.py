"""stitchtime core: the method of "Stitch it in Time" as pure functions and modules.

Nothing here imports Prefect, boto3 or a CLI library (see DESIGN.md, layers).
"""

__version__ = "0.1.0"
