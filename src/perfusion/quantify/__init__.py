"""The measuring stages, in the order the pipeline runs them.

signal (baseline, ΔR2*, brain mask) -> echoes (multi-echo combination) -> motion and register (head
motion, anatomy) -> aif (arterial input, venous scaling) -> leakage (contrast leakage correction) ->
deconvolution, modelfit, gammafit (residue functions) -> maps (CBV, CBF, MTT, Tmax, TTP) -> reference
(normal-appearing white matter) -> roi (lesion scores and the verdict).

Units at every public function's edges: time in s, CBV mL/100 g, CBF mL/100 g/min.
"""
