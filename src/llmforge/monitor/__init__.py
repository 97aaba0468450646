"""Monitor stage: what the served model was asked, what it answered, and what users thought."""
