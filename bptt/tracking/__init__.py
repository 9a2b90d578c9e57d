"""MLflow tracking: the store and run (``mlflow_tracking``), the Lightning logger (``run_logger``), a config as
params (``params``), the curves (``curves``) and ``bptt runs``' table (``runs_table``)."""
