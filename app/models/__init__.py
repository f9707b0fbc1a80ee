"""Teacher models: upload, inspect, list, read, delete and download."""
