"""Running a study on Ray Tune: ``runner`` (one invocation: plan, checks, Tune, report),
``trainable`` (a trial or a pack of trials inside a Ray worker), ``callbacks`` (the driver's
reactions to trial events: MLflow runs, progress lines, checkpoints), ``search`` (Optuna's TPE
and ASHA for tuning studies), ``mo_asha`` (ASHA for several objectives), ``interrupt`` (SIGINT and
SIGTERM stop a study gracefully), ``cluster`` (joining or starting Ray, resource checks) and
``full_storage`` (a full disk or bucket stops a study in one line)."""
