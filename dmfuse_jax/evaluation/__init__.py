"""Evaluation: the field's fusion metrics (`metrics.METRICS`), classical baselines
(`baselines.BASELINES`), reports (CSV, markdown, radar and bar plots) and `dmfuse evaluate`."""
