"""Measurements of stages and cascades: image metrics, FID/KID, the digit classifier."""
