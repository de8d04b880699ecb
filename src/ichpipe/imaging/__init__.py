"""Images from DICOM files: pixels and Hounsfield units with the data's quirks fixed, CT windows, the head crop, PNGs.
Stands on base only."""
