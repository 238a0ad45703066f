"""MLflow: the store, one run per spec, the teacher registry, queries."""
