"""SPM Facilitated Transport for Stable Diffusion WebUIs (A1111 >= 1.9, Forge).

Pure-Python core of the extension: everything here is importable and testable
without a WebUI. The only WebUI-facing file is ``scripts/spm_membranes.py``.
"""

__version__ = "0.1.0"
