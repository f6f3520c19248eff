"""orchestrate: running studies on Ray Tune with Optuna, tracking every trial in MLflow, and the
study report. Its rooms, from the command lines down:

- ``ablation`` and ``ui``: the command lines (``python -m orchestrate.ablation`` runs a study,
  ``python -m orchestrate.ui`` serves MLflow's UI on its store; ``python -m orchestrate.report``
  is the report package's);
- ``run``: one invocation of a study on Ray Tune, and what runs inside Ray;
- ``report``: the study report, read from MLflow alone;
- ``plan``: the study's trials and its ledger of what already ran;
- ``store``: storage (folders, object stores) and MLflow tracking.

A room imports only the rooms below it.
"""
