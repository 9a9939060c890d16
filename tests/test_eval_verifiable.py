"""eval verifiable: IFEval's four metrics on a hand-built set, failed responses, and bad input."""

from __future__ import annotations

import json

import pytest

from alignline.config import load_config
from alignline.data.io import write_records
from alignline.data.records import Prompt, Response
from alignline.errors import DataError
from alignline.stages import eval_verifiable


def ins(name, **kwargs):
    return {"id": name, "kwargs": kwargs, "text": f"({name})"}


PROMPTS = [
    Prompt(id="p1", messages=[{"role": "user", "content": "Greet me."}],
           meta={"instructions": [ins("no_commas"), ins("all_lowercase")]}),
    Prompt(id="p2", messages=[{"role": "user", "content": "What is 2 + 2?"}],
           meta={"instructions": [ins("all_lowercase"), ins("end_with", phrase="Hope this helps!")]}),
    Prompt(id="p3", messages=[{"role": "user", "content": "List two letters."}],
           meta={"instructions": [ins("no_commas"), ins("quoted")]}),
    Prompt(id="p4", messages=[{"role": "user", "content": "Name a colour."}],
           meta={"instructions": [ins("title")]}),
]

TEXTS = {
    "p1": "hello there friend",
    "p2": "Sure! here you go\nthe answer is four. hope this helps!",
    "p3": "a, b",
}


def responses():
    out = [Response(prompt_id=k, sample_idx=0, text=v, source="m") for k, v in TEXTS.items()]
    return [*out, Response(prompt_id="p4", sample_idx=0, text="", source="m", status="failed", error="HTTP 500")]


def cfg(tmp_path, *extra):
    return load_config(eval_verifiable.VerifiableConfig, None, [
        f"prompts={tmp_path / 'prompts.jsonl'}", f"output_dir={tmp_path / 'out'}", *extra])


def test_ifeval_metrics_by_hand(tmp_path):
    """Per prompt (strict | loose):
    p1 no_commas, all_lowercase on "hello there friend": T T | T T.
    p2 all_lowercase, end_with "Hope this helps!": the first line "Sure! ..." has a capital, so strict F T;
       loose drops the first line: T T.
    p3 no_commas, quoted on "a, b": F F | F F (one line: no loose variant helps).
    p4 title: the response failed at the engine -> not followed: F | F.
    prompt level: strict 1/4 (p1), loose 2/4 (p1, p2); instruction level: strict (2 + 1 + 0 + 0) / 7 = 3/7,
    loose (2 + 2 + 0 + 0) / 7 = 4/7. Per type: all_lowercase n 2, strict 1/2, loose 2/2; no_commas n 2,
    1/2 and 1/2; end_with 1 and 1; quoted 0 and 0; title 0 and 0."""
    write_records(tmp_path / "prompts.jsonl", PROMPTS)
    write_records(tmp_path / "responses.jsonl", responses())
    out = eval_verifiable.run(cfg(tmp_path, f"model.responses={tmp_path / 'responses.jsonl'}"))
    res = json.loads((out / "results.json").read_text())
    assert (res["n_prompts"], res["n_instructions"]) == (4, 7)
    assert res["prompt_level_strict"] == pytest.approx(1 / 4)
    assert res["prompt_level_loose"] == pytest.approx(2 / 4)
    assert res["instruction_level_strict"] == pytest.approx(3 / 7)
    assert res["instruction_level_loose"] == pytest.approx(4 / 7)
    assert res["per_type"]["all_lowercase"] == {"n": 2, "strict": 0.5, "loose": 1.0}
    assert res["per_type"]["no_commas"] == {"n": 2, "strict": 0.5, "loose": 0.5}
    assert res["per_type"]["end_with"] == {"n": 1, "strict": 1.0, "loose": 1.0}
    assert res["per_type"]["title"] == {"n": 1, "strict": 0.0, "loose": 0.0}
    assert (res["failed_responses"], res["failed_prompt_ids"]) == (1, ["p4"])
    rows = [json.loads(ln) for ln in (out / "verifications.jsonl").read_text().splitlines()]
    assert rows[1] == {"prompt_id": "p2", "status": "ok", "instructions": ["all_lowercase", "end_with"],
                       "strict": [False, True], "loose": [True, True]}
    assert json.loads((out / "manifest.json").read_text())["counts"]["failed_responses"] == 1


def test_generated_responses_are_checked_and_saved(tmp_path, monkeypatch):
    """The same texts from a scripted engine give the same numbers; the responses are saved in the run."""

    class Scripted:
        def generate(self, prompts, n, sampling):
            return [[r] for r in responses() if r.prompt_id in {p.id for p in prompts}]

    monkeypatch.setattr(eval_verifiable, "build_engine", lambda settings: Scripted())
    write_records(tmp_path / "prompts.jsonl", PROMPTS)
    out = eval_verifiable.run(cfg(tmp_path, "model.model=scripted", "max_prompts=2"))
    res = json.loads((out / "results.json").read_text())
    assert (res["n_prompts"], res["prompt_level_strict"], res["prompt_level_loose"]) == (2, 0.5, 1.0)
    assert res["model"] == "scripted"
    assert len((out / "model_responses.jsonl").read_text().splitlines()) == 2


def test_bad_inputs_name_the_file_and_ids(tmp_path):
    write_records(tmp_path / "prompts.jsonl", PROMPTS)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError) as exc:
        eval_verifiable.run(cfg(tmp_path, f"model.responses={tmp_path / 'empty.jsonl'}"))
    assert str(tmp_path / "empty.jsonl") in str(exc.value) and "no Response records" in str(exc.value)
    write_records(tmp_path / "part.jsonl", responses()[:2])
    with pytest.raises(DataError, match=r"no response for 2 of the 4 prompts evaluated: p3, p4"):
        eval_verifiable.run(cfg(tmp_path, f"model.responses={tmp_path / 'part.jsonl'}"))
    bare = [*PROMPTS, Prompt(id="p5", messages=[{"role": "user", "content": "Hi"}])]
    write_records(tmp_path / "prompts.jsonl", bare)
    with pytest.raises(DataError) as exc:
        eval_verifiable.run(cfg(tmp_path, f"model.responses={tmp_path / 'part.jsonl'}"))
    assert "prompts.jsonl" in str(exc.value) and "p5" in str(exc.value) and "meta.instructions" in str(exc.value)
