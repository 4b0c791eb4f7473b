"""Benchmarks: quality vs peers (`bench.quality`), calibration speed (`bench.calib_speed`), decode speed."""
