"""Where records come from and what keeps them: locations, record sources, caches."""
