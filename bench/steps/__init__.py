"""The steps of the benchmark suite, one module per kind (bench/run.py lists them in order).

A step is a function of the harness (`bench.harness.Bench`): it starts what it measures, adds
its rows to the table and its figures to results.json. Steps import the harness and
bench/common.py (and `large`, in pipeline.py, s3.py's rclone_copy); the harness imports no step.
"""
