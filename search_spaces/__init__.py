"""search_spaces: the studies (the paper's Tables 3, 4, 5 and a tuning study) as TOML data, and
the loader that validates them and turns them into trial configs."""

from search_spaces.study import (
    Cell,
    Param,
    Study,
    StudyError,
    TrialSpec,
    TuneSettings,
    list_studies,
    load_study,
)

__all__ = [
    "Cell",
    "Param",
    "Study",
    "StudyError",
    "TrialSpec",
    "TuneSettings",
    "list_studies",
    "load_study",
]
