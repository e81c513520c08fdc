"""The UniMedVL DICOM node: receive, index, complete, route, export."""
