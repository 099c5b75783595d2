"""Developer tools that make weight files; never imported by the detector."""
