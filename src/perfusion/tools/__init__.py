"""Tools around the pipeline: phantom and phantom_realistic (synthetic series with known truth),
validate (accuracy against phantoms and the OSIPI reference curves), bench (speed and memory)."""
