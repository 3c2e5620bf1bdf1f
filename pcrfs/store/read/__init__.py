"""Reading a store: the Store, its read tiers and their pure policies."""
