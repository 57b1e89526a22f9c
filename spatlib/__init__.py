"""spat-kit: Semantics-Preserving Adversarial Training (SPAT, arXiv:2009.10978), reproducible.

Importing spatlib touches no GPU: device and dtype are arguments everywhere.
"""
__version__ = "0.2.0"
