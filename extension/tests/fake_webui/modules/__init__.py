"""A minimal stand-in for the WebUI's ``modules`` package: just what
``scripts/spm_membranes.py`` touches. Written for these tests; no WebUI code."""
