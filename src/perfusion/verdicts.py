"""The verdicts a lesion can get and the words that say them: one table for the terminal, report.json
readers, report.html, compare and the batch index. No numerics here (the rule that picks a verdict:
quantify/roi.py), so the command line and the batch index import it without numpy or numba."""

#: Verdict codes. ``possible_recurrence_or_pseudoprogression``: a high rCBV inside the pseudoprogression
#: window; ``not_assessable``: a gate (roi.GATES) failed, the rCBV is not read.
VERDICTS = ("likely_recurrence", "possible_recurrence_or_pseudoprogression", "likely_treatment_effect",
            "indeterminate", "not_assessable")

#: Each verdict in words, lower case (the batch index's verdict column).
VERDICT_WORDS = {
    "likely_recurrence": "likely recurrence",
    "possible_recurrence_or_pseudoprogression": "possible recurrence or pseudoprogression",
    "likely_treatment_effect": "likely treatment effect",
    "indeterminate": "indeterminate",
    "not_assessable": "not assessable",
}

#: What a verdict must not be read without, where a case's summary and report name it: a possible
#: recurrence inside the pseudoprogression window is confirmed at short interval before acting on it.
VERDICT_ADVICE = {"possible_recurrence_or_pseudoprogression": "confirm at short interval"}

#: The verdict as a case's summary (terminal, compare) says it: its words and any advice, lower case.
VERDICT_LABEL = {v: f"{words}: {VERDICT_ADVICE[v]}" if v in VERDICT_ADVICE else words
                 for v, words in VERDICT_WORDS.items()}

#: The verdict as a heading of report.html and compare.html: the label, capitalised.
VERDICT_HEADING = {v: label[0].upper() + label[1:] for v, label in VERDICT_LABEL.items()}
