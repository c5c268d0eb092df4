"""Observers, calibration, quantization planning and QDQ insertion."""
