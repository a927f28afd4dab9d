"""fwi_core: the library vendored into every FWI Kaggle notebook (numpy + torch only)."""
__version__ = "0.1.0"
