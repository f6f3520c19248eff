"""orchestrate: Ray Tune + Optuna scheduling and MLflow tracking of studies (issue 5 builds it)."""
