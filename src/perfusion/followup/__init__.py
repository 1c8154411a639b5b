"""Follow-up: two time points of one patient. compare (register the prior onto the current scan, per
ROI the change of rCBV and its pattern: compare.json) and page (compare.html and writing the results)."""
