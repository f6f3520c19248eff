"""The study report, from MLflow alone: ``collect`` (a study session as plain data),
``statistics`` (the two questions each contrast answers), ``cv_levels`` (the simulated levels of
the k-fold designs), ``pareto`` (accuracy against cost), ``tuning`` (what a tuning study found),
``study_report`` (the report's data), ``build`` (building and writing it) and ``render`` (the
terminal, Markdown, LaTeX and HTML forms). ``python -m orchestrate.report`` rebuilds a study's
report."""
