"""Several gold answers per example: TriviaQA aliases (with TriviaQA's normalisation) and every
WebQuestions answer count as hits; rows use the datasets' real field layouts."""

from __future__ import annotations

import datasets
import pytest

from multipromot.data.exemplars import build_item
from multipromot.data.metrics import exact_match, normalize_triviaqa, score, triviaqa_exact_match
from multipromot.data.mirror import set_mirror, write_snapshot
from multipromot.data.tasks import get_task, task_from_spec
from multipromot.errors import UserError

TRIVIA = [  # mandarjoshi/trivia_qa rc.nocontext: the answer record as the dataset has it
    {
        "question": "Which city is the capital of France?",
        "question_id": "tc_1",
        "question_source": "http://www.quiz.example",
        "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
        "search_results": {
            "description": [],
            "filename": [],
            "rank": [],
            "title": [],
            "url": [],
            "search_context": [],
        },
        "answer": {
            "aliases": ["Paris", "Paris, France", "City of Light"],
            "normalized_aliases": ["paris", "paris france", "city of light"],
            "matched_wiki_entity_name": "",
            "normalized_matched_wiki_entity_name": "",
            "normalized_value": "paris",
            "type": "WikipediaEntity",
            "value": "Paris",
        },
    }
]
WEBQ = [  # stanfordnlp/web_questions
    {
        "url": "http://www.freebase.com/view/en/x",
        "question": "what does jamaican people speak?",
        "answers": ["Jamaican English", "Jamaican Creole English Language"],
    },
]


@pytest.fixture
def mirror(tmp_path):
    rows = datasets.Dataset.from_list
    write_snapshot(
        tmp_path,
        "mandarjoshi/trivia_qa",
        "rc.nocontext",
        {"train": rows(TRIVIA), "validation": rows(TRIVIA)},
    )
    write_snapshot(
        tmp_path, "stanfordnlp/web_questions", None, {"train": rows(WEBQ), "test": rows(WEBQ)}
    )
    set_mirror(tmp_path)
    yield tmp_path
    set_mirror(None)
    for name in ("trivia_qa", "web_questions"):
        get_task(name).clear_cache()


def test_an_alias_that_is_not_the_first_answer_scores_100(mirror):
    trivia = get_task("trivia_qa")
    item = build_item(trivia, 0, split="test")
    assert item.target == "Paris" and "City of Light" in item.references
    assert score(trivia.metric, ["city of light"], [item.gold]) == 100.0
    assert score(trivia.metric, ["Paris France"], [item.gold]) == 100.0  # punctuation -> space
    assert score(trivia.metric, ["Lyon"], [item.gold]) == 0.0
    webq = get_task("web_questions")
    item = build_item(webq, 0, split="test")
    assert score(webq.metric, ["Jamaican Creole English Language"], [item.gold]) == 100.0
    # With the first answer as the only reference (the old behaviour) that was a miss.
    assert exact_match(["Jamaican Creole English Language"], [item.target]) == 0.0


def test_triviaqa_normalisation_turns_punctuation_into_spaces():
    assert normalize_triviaqa("The well-known  City_of Light!") == "well known city of light"
    assert triviaqa_exact_match(["well known"], [["Well-known"]]) == 100.0
    assert exact_match(["well known"], [["Well-known"]]) == 0.0  # SQuAD's rule drops the dash


def test_references_are_checked_when_the_task_is_read(tmp_path):
    spec = {
        "name": "t",
        "source": {"generator": "lab_qa"},
        "metric": "exact_match",
        "template": {"jinja": "{{question}} ||| {{answer}}"},
    }
    with pytest.raises(UserError, match=r"tasks\[0\]\.references: .* is not a valid expression"):
        task_from_spec({**spec, "references": "answers[("}, file="m.yaml", key="tasks[0]")
    task = task_from_spec({**spec, "references": "42"}, file="m.yaml", key="tasks[0]")
    with pytest.raises(UserError, match="must give strings"):
        task.reference_list({"answer": "x"})
