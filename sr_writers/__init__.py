"""DICOM result objects (SR, SEG, SC, derived series) from typed model results."""
