"""Data layer: the Kaggle layout, datasets, normalisation, balancing, folds,
augmentation and submissions."""
from .augment import add_noise, hflip, scale_amplitude
from .dataset import FWIDataset, TestDataset
from ..errors import DataError, DataFormatError, LayoutError, MissingPairError, SubmissionError
from .io import SEIS_SHAPE, VEL_SHAPE, open_npy
from .layout import FilePair, find_competition_root, index_train, list_test, load_test_sample
from .normalize import (denormalize_seismic, denormalize_velocity, normalize_seismic,
                        normalize_velocity)
from .sampling import balanced_indices, family_kfold
from .submission import (HEADER, ODD_COLUMNS, SubmissionRangeWarning, SubmissionWriter, expand_odd_columns,
                         load_solution, read_submission_maps, score_submission, validate_submission,
                         write_submission)

__all__ = [
    "hflip", "scale_amplitude", "add_noise", "FWIDataset", "TestDataset", "DataError", "DataFormatError", "LayoutError",
    "MissingPairError", "SubmissionError", "SEIS_SHAPE", "VEL_SHAPE", "open_npy", "FilePair",
    "find_competition_root", "index_train", "list_test", "load_test_sample",
    "normalize_seismic", "denormalize_seismic", "normalize_velocity", "denormalize_velocity",
    "balanced_indices", "family_kfold",
    "HEADER", "ODD_COLUMNS", "SubmissionWriter", "write_submission", "validate_submission",
    "score_submission", "load_solution", "SubmissionRangeWarning", "read_submission_maps", "expand_odd_columns",
]
