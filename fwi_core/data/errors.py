"""Errors a user can cause with bad competition data or submissions."""


class DataError(ValueError):
    """Base class: something in the data is not what the competition layout promises."""


class DataFormatError(DataError):
    """A file that is not a readable .npy of the expected shape/dtype/values."""


class MissingPairError(DataError):
    """A seismic file without its velocity file (or the reverse)."""


class LayoutError(DataError):
    """No competition root, or a root without the expected folders."""


class SubmissionError(DataError):
    """A submission file that Kaggle would reject or score wrongly."""
