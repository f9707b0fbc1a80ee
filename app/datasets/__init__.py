"""Transfer datasets: upload, inspect, list, read, delete and download."""
