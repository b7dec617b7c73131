"""Calibration data and quantization of bundle graphs (issue 7); empty until then."""
