"""Document filters and annotators that run as steps of the data pipeline."""
