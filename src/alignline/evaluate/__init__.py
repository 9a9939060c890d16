"""Evaluation libraries behind the ``alignline eval ...`` stages: MT-bench (:mod:`.mtbench`), pairwise and
length-controlled win rates (:mod:`.winrate`), the judge injection suite (:mod:`.injection`), and IFEval
(:mod:`.ifeval`, with :mod:`.punkt_tab` and the clustered and paired standard errors of :mod:`.clustered`)."""
