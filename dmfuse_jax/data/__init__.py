"""Data: image I/O shared by every command, and the grain pipelines for both training stages."""
