"""lm-eval task configs (templates: `evaluation.benchmarks.write_task_dir` renders them); a package so
the YAMLs and utils.py ship as package data."""
