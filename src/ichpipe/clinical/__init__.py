"""A bundle on new studies: DICOM studies read into series, the bundle's models run on a series, the series figure and
the DICOM Structured Report. Stands on scoring and below; `predict` and `evaluate` (in stages) use it."""
