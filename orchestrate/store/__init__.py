"""Where a study keeps what it makes: ``storage`` (a local folder or an object store, for
checkpoints, Tune's state, sessions and leases) and ``tracking`` (the MLflow experiment of a
study: its parent run, one child run per trial, logged models and the registry)."""
