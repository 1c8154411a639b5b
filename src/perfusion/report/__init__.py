"""What a reader sees: build (report.json, the machine-readable record) and html (report.html, its
figures and the verdict page)."""
