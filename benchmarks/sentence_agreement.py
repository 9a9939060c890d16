"""How often the verifier's data-free sentence and capital-word counts equal those of NLTK's English Punkt model
(the official IFEval checker's), on ShareGPT's assistant answers (docs/guide.md, "Verifiable instructions").

Needs NLTK's punkt_tab data (``NLTK_DATA`` pointing at it) and the installed ShareGPT asset:

    NLTK_DATA=/path/to/nltk_data python benchmarks/sentence_agreement.py --answers 3000
"""

from __future__ import annotations

import argparse
import json
import random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=3000, help="answers drawn (seed 0) from ShareGPT")
    args = parser.parse_args()

    import nltk

    from alignline.data.sharegpt import read_sharegpt, sharegpt_asset_path
    from alignline.judges import instruction_checks as checks

    raw, _ = read_sharegpt(str(sharegpt_asset_path()))
    answers = [m["value"] for conv in raw for m in conv.get("conversations", [])
               if m.get("from") == "gpt" and m.get("value")]
    random.Random(0).shuffle(answers)
    answers = answers[: args.answers]
    official = nltk.tokenize.PunktTokenizer("english")
    same_count = same_verdict = same_capitals = 0
    for text in answers:
        theirs, ours = len(official.tokenize(text)), checks.count_sentences(text)
        same_count += theirs == ours
        same_verdict += sum((theirs < n) == (ours < n) for n in range(1, 21))
        same_capitals += sum(t.isupper() for t in nltk.word_tokenize(text)) == checks.count_capital_words(text)
    n = len(answers)
    print(json.dumps({"answers": n, "nltk": nltk.__version__, "same_sentence_count": same_count / n,
                      "same_verdict_n_1_to_20": same_verdict / (20 * n), "same_capital_word_count": same_capitals / n}))


if __name__ == "__main__":
    main()
