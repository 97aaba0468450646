"""Near-duplicate detection: MinHash signatures, LSH buckets and union-find clusters."""
