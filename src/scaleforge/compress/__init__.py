"""Compression: converters from a finished run directory to a smaller or faster one (`convert.compress_run`)."""
