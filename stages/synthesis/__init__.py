"""Synthetic subjects in the capture format, with exact ground truth (SPEC §6)."""
