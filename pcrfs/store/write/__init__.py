"""Writing a store: the record writer and the sinks that put records in place."""
