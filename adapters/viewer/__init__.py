"""The OHIF viewer port: OHIF's static files and the DICOMweb app on one origin."""
