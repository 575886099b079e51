"""Training: the steps that fit and publish enrichment artifacts."""
