"""``python -m orchestrate.report``: rebuild a study's report from MLflow alone."""

from orchestrate.report.build import main

if __name__ == "__main__":
    raise SystemExit(main())
