"""A batch run's executors: reading its source into batch entries."""
