"""orchestrate: running studies on Ray Tune with Optuna, tracking every trial in MLflow, and the
study report.

- the plan and its ledger: ``runner`` (a study's plan and one invocation of it), ``ledger``
  (which trials finished, diverged or continue), ``sessions``, ``lease``, ``packing``;
- on Tune: ``trainable`` (one trial or pack), ``callbacks`` (MLflow runs and progress),
  ``search`` (Optuna), ``mo_asha`` and ``interrupt`` (schedulers), ``cluster``;
- storage and tracking: ``storage`` (local folders and object stores), ``full_storage`` (a
  full disk or bucket mid-study), ``tracking`` (MLflow);
- the report: ``collect`` (from MLflow), ``statistics``, ``cv_levels``, ``pareto``,
  ``tuning``, ``study_report``, ``report`` and ``render``;
- the command lines: ``ablation`` (run a study), ``report`` (rebuild its report), ``ui``.
"""
