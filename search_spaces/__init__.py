"""search_spaces: the studies (the paper's Tables 3, 4, 5 and a tuning study) as TOML data, and
the loader that validates them and turns them into trial configs."""

from search_spaces.study import (
    STUDY_DIR,
    Cell,
    Contrast,
    Param,
    Study,
    StudyError,
    TrialSpec,
    TuneSettings,
    list_studies,
    load_study,
    study_contrasts,
)

__all__ = [
    "STUDY_DIR",
    "Cell",
    "Contrast",
    "Param",
    "Study",
    "StudyError",
    "TrialSpec",
    "TuneSettings",
    "list_studies",
    "load_study",
    "study_contrasts",
]
