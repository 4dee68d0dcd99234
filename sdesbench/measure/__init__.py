"""Measurements on trained runs (loss balance along training, ...), read by commands and reports."""
