"""Many cases at once: discovery (find the cases of a folder, BIDS or plain) and engine (run them on
a Dask cluster or in process, resume, summarise)."""
