"""Evaluation libraries behind the ``alignline eval ...`` stages: MT-bench (:mod:`.mtbench`), pairwise and
length-controlled win rates (:mod:`.winrate`) and the judge injection suite (:mod:`.injection`)."""
