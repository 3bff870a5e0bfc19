"""Templates: the paper's catalogue templates, promptsource offline, the sandbox, error messages."""

from __future__ import annotations

import pickle

import pytest

from multipromot.data.catalogue import catalogue_dir, read_catalogue
from multipromot.data.templates import (
    FormatSignature,
    Template,
    get_template,
    list_templates,
    load_template,
    register_template,
    reset_templates,
)
from multipromot.errors import UserError

RTE_JINJA = (
    "{{premise}} question: {{hypothesis}} Is it true or false? answer: ||| "
    "{{answer_choices[label]}}"
)


@pytest.fixture(autouse=True)
def _clean_registry():
    reset_templates()
    yield
    reset_templates()


# -- the paper's catalogue templates -----------------------------------------------------------

# One hand-written example per task, in its hub dataset's field layout, and the exact strings.
PAPER_CASES = {
    "rte": (
        {
            "premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
            "hypothesis": "Weapons of Mass Destruction Found in Iraq.",
            "label": 1,
            "idx": 0,
        },
        "No Weapons of Mass Destruction Found in Iraq Yet. question: Weapons of Mass "
        "Destruction Found in Iraq. Is it true or false? answer:",
        "False",
    ),
    "cb": (
        {
            "premise": "It was a complex language. Not written down but handed down.",
            "hypothesis": "the language was peeled down",
            "label": 2,
            "idx": 0,
        },
        "It was a complex language. Not written down but handed down. question: the language "
        "was peeled down Is it true or false or neither? answer:",
        "Neither",
    ),
    "snli": (
        {
            "premise": "A person on a horse jumps over a broken down airplane.",
            "hypothesis": "A person is at a diner, ordering an omelette.",
            "label": 2,  # snli: 2 = contradiction (cb's 2 is neutral)
        },
        "A person on a horse jumps over a broken down airplane. question: A person is at a "
        "diner, ordering an omelette. Is it true or false or neither? answer:",
        "False",
    ),
    "wic": (
        {
            "word": "place",
            "sentence1": "Do you want to come over to my place later?",
            "sentence2": "A political system with no place for the less prominent groups.",
            "start1": 31,
            "start2": 27,
            "end1": 36,
            "end2": 32,
            "idx": 0,
            "label": 0,
        },
        "Do you want to come over to my place later? A political system with no place for the "
        "less prominent groups. question: The word place is used in the same way in the two "
        "sentences. Is it true or False? answer:",
        "False",
    ),
    "openbookqa": (
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": {
                "text": [
                    "puppies learning new tricks",
                    "children growing up and getting old",
                    "flowers wilting in a vase",
                    "plants sprouting, blooming and wilting",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "D",
        },
        "Q: The sun is responsible for A) puppies learning new tricks B) children growing up "
        "and getting old C) flowers wilting in a vase D) plants sprouting, blooming and "
        "wilting A:",
        "D",
    ),
    "trivia_qa": (
        {
            "question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
            "question_id": "tc_33",
            "question_source": "http://www.quiz-zone.co.uk/",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {"description": [], "filename": [], "rank": [], "title": []},
            "answer": {
                "aliases": ["Sunset Blvd", "Sunset Boulevard"],
                "normalized_aliases": ["sunset blvd", "sunset boulevard"],
                "matched_wiki_entity_name": "",
                "normalized_matched_wiki_entity_name": "",
                "normalized_value": "sunset boulevard",
                "type": "WikipediaEntity",
                "value": "Sunset Boulevard",
            },
        },
        "Q: Which Lloyd Webber musical premiered in the US on 10th December 1993? A:",
        "Sunset Boulevard",
    ),
    "web_questions": (
        {
            "url": "http://www.freebase.com/view/en/justin_bieber",
            "question": "what is the name of justin bieber brother?",
            "answers": ["Jazmyn Bieber", "Jaxon Bieber"],
        },
        "Q: what is the name of justin bieber brother? A:",
        "Jazmyn Bieber",
    ),
    "wmt14_en_fr": (
        {"translation": {"fr": "Reprise de la session", "en": "Resumption of the session"}},
        "Translate English to French: Resumption of the session",
        "Reprise de la session",
    ),
    "wmt16_en_de": (
        {"translation": {"de": "Wiederaufnahme der Sitzungsperiode", "en": "Resumption"}},
        "Translate English to German: Resumption",
        "Wiederaufnahme der Sitzungsperiode",
    ),
    "wmt16_en_ro": (
        {"translation": {"ro": "Reluarea sesiunii", "en": "Resumption of the session"}},
        "Translate English to Romanian: Resumption of the session",
        "Reluarea sesiunii",
    ),
    "xsum": (
        {
            "document": "The full cost of damage in Newton Stewart is still being assessed.\n"
            "Repair work is ongoing.",
            "summary": "Clean-up operations are continuing across the Scottish Borders.",
            "id": "35232142",
        },
        "Article: The full cost of damage in Newton Stewart is still being assessed.\n"
        "Repair work is ongoing. One sentence summary:",
        "Clean-up operations are continuing across the Scottish Borders.",
    ),
    "wiki_lingua_en": (
        {
            "gem_id": "wikilingua_en-train-1",
            "gem_parent_id": "wikilingua_en-train-1",
            "source_language": "en",
            "target_language": "en",
            "source": "Go to the settings page. Select the privacy tab.",
            "target": "Open the privacy settings.",
            "references": ["Open the privacy settings."],
        },
        "Article: Go to the settings page. Select the privacy tab. One sentence summary:",
        "Open the privacy settings.",
    ),
}


def test_every_paper_task_has_a_render_case():
    names = {entry.name for entry in read_catalogue(catalogue_dir() / "paper.yaml")}
    assert names == set(PAPER_CASES)


@pytest.mark.parametrize("name", sorted(PAPER_CASES))
def test_paper_template_renders_exactly(name):
    example, expected_input, expected_target = PAPER_CASES[name]
    template = get_template(name)
    assert template.id == name
    assert template.apply(example) == (expected_input, expected_target)


def test_paper_answer_sets_follow_label_ids():
    assert get_template("rte").answers() == ["True", "False"]
    assert get_template("cb").answers() == ["True", "False", "Neither"]
    assert get_template("snli").answers() == ["True", "Neither", "False"]
    assert get_template("wic").answers() == ["False", "True"]
    assert get_template("openbookqa").answers() == ["A", "B", "C", "D"]
    assert get_template("xsum").answers() is None


def test_rte_signature_is_the_literal_input_text():
    assert get_template("rte").signature == FormatSignature(
        pieces=("question:", "Is it true or false? answer:"), answers=("True", "False")
    )


def test_signatures_of_other_formats():
    assert get_template("wmt14_en_fr").signature == FormatSignature(
        pieces=("Translate English to French:",), answers=None
    )
    assert get_template("openbookqa").signature.pieces == ("Q:", "A)", "B)", "C)", "D)", "A:")
    assert get_template("wic").signature.pieces == (
        "question: The word",
        "is used in the same way in the two sentences. Is it true or False? answer:",
    )


def test_signature_skips_conditional_text_and_punctuation_only_pieces():
    template = Template(
        "t",
        "{{a}} , {% if b %}only sometimes{% endif %}\n  Tell   me: {{c}} ||| {{d}}",
    )
    assert template.signature.pieces == ("Tell me:",)


# -- promptsource, offline ---------------------------------------------------------------------


def test_promptsource_template_renders_offline():
    template = load_template({"promptsource": "super_glue/rte", "name": "GPT-3 style"})
    assert template.id == "promptsource:super_glue/rte:GPT-3 style"
    example = {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0, "idx": 3}
    assert template.apply(example) == (
        "A cat sat.\nQuestion: An animal sat. True or False?",
        "True",
    )
    # promptsource guards unlabeled test rows: the target is empty, the input is unchanged
    assert template.apply({**example, "label": -1})[1] == ""
    assert template.answers() == ["True", "False"]
    assert template.signature.pieces == ("Question:", "True or False?")


def test_promptsource_choice_filter_is_deterministic():
    template = load_template({"promptsource": "web_questions", "name": "short_general_knowledge_q"})
    example = {"url": "u", "question": "who?", "answers": ["a", "b", "c", "d"]}
    first = template.apply(example)
    assert first[0] == "Short general knowledge question: who?"
    assert first[1] in {"a", "b", "c", "d"}
    assert all(template.apply(example) == first for _ in range(5))


def test_unknown_promptsource_dataset_and_name():
    with pytest.raises(UserError) as err:
        load_template({"promptsource": "super_glue/rtx", "name": "x"}, file="m.yaml", key="t")
    assert str(err.value) == (
        "m.yaml: t.promptsource: promptsource has no templates for 'super_glue/rtx'; "
        "did you mean super_glue/rte, super_glue/axg, super_glue/axb?"
    )
    with pytest.raises(UserError) as err:
        load_template({"promptsource": "super_glue/rte", "name": "GPT3"}, file="m.yaml", key="t")
    assert str(err.value).startswith(
        "m.yaml: t.name: promptsource 'super_glue/rte' has no template 'GPT3' (it has: "
        "GPT-3 style, MNLI crowdsource,"
    )


def test_promptsource_name_cannot_leave_its_folder():
    with pytest.raises(UserError, match="promptsource has no templates for '../../promptsource'"):
        load_template({"promptsource": "../../promptsource", "name": "x"})


# -- the sandbox -------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ premise.__class__.__base__.__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.__builtins__ }}",
    "{{ [1, 2].append(3) }}",
    "{{ 'a' * 10**9 }}",
    "{{ 2 ** (10 ** 9) }}",
    "{{ range(10**9) | list }}",
    "{% include '/etc/passwd' %}",
    "{{ ''.format.__self__ }}",
]


@pytest.mark.parametrize("escape", ESCAPES)
def test_sandbox_refuses_python_internals(escape):
    template = load_template(
        {"jinja": escape + " ||| x"}, file="evil.yaml", key="tasks[0].template"
    )
    with pytest.raises(UserError) as err:
        template.apply({"premise": "p"})
    assert err.value.file == "evil.yaml"
    assert err.value.key == "tasks[0].template"
    assert f"template {template.id!r}" in err.value.message
    assert "\n" not in str(err.value)


def test_sandbox_names_the_violation():
    template = Template("evil", "{{ ''.__class__ }} ||| x", file="evil.yaml", key="k")
    with pytest.raises(UserError) as err:
        template.apply({})
    assert str(err.value) == (
        "evil.yaml: k: template 'evil' was stopped by the sandbox in template (access to "
        "attribute '__class__' of 'str' object is unsafe.); templates may only read the "
        "example's fields"
    )


def test_sandbox_also_guards_answer_choices():
    with pytest.raises(UserError, match="stopped by the sandbox in answer_choices"):
        Template("evil", "{{x}} ||| {{answer_choices[0]}}", "{{ ''.__class__ }} ||| b")


# -- errors ------------------------------------------------------------------------------------


def _inline(jinja=RTE_JINJA, choices="True ||| False"):
    return load_template(
        {"jinja": jinja, "answer_choices": choices},
        file="m.yaml",
        key="tasks[2].template",
        id="my_rte",
    )


def test_missing_field_names_the_field():
    with pytest.raises(UserError) as err:
        _inline().apply({"premise": "A cat.", "label": 0})
    assert str(err.value) == (
        "m.yaml: tasks[2].template: template 'my_rte' needs field 'hypothesis', which the "
        "example lacks (fields: label, premise)"
    )


def test_missing_nested_key_names_the_key():
    template = Template("qa", "Q: {{question}} A: ||| {{answer.value}}")
    with pytest.raises(UserError, match="needs key 'value'"):
        template.apply({"question": "q", "answer": {"aliases": []}})


def test_syntax_error_names_file_and_key():
    with pytest.raises(UserError) as err:
        _inline(jinja="{{premise} question ||| {{label}}")
    assert str(err.value) == (
        "m.yaml: tasks[2].template: template 'my_rte': Jinja syntax error in template "
        "(line 1): unexpected '}'"
    )


def test_template_needs_a_separator():
    with pytest.raises(UserError, match=r"template 'my_rte' has no '\|\|\|' between"):
        _inline(jinja="{{premise}} question: {{hypothesis}}")


def test_answer_choices_required_when_used():
    with pytest.raises(UserError, match="uses answer_choices, but no answer_choices are given"):
        Template("t", "{{x}} ||| {{answer_choices[label]}}")


def test_rendering_two_separators_is_an_error():
    with pytest.raises(UserError, match="rendered 2"):
        Template("t", "{{x}} ||| a ||| b").apply({"x": 1})


def test_separator_inside_a_field_survives():
    source, target = _inline().apply({"premise": "a ||| b", "hypothesis": "c", "label": 0})
    assert source == "a ||| b question: c Is it true or false? answer:"
    assert target == "True"


def test_answers_per_example_when_choices_use_fields():
    template = Template(
        "mc", "{{q}} ||| {{answer_choices[label]}}", "{{ options | join(' ||| ') }}"
    )
    example = {"q": "Pick", "options": ["red", "blue"], "label": 1}
    assert template.answers() is None
    assert template.answers(example) == ["red", "blue"]
    assert template.apply(example) == ("Pick", "blue")
    assert template.signature.answers is None


def test_inline_answer_choices_may_be_a_list():
    template = load_template({"jinja": RTE_JINJA, "answer_choices": ["Yes", "No"]})
    assert template.answer_choices == "Yes ||| No"
    assert template.id.startswith("inline-")
    assert template.apply({"premise": "p", "hypothesis": "h", "label": 1})[1] == "No"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"jinja": RTE_JINJA, "answers": "True ||| False"},
            "m.yaml: tasks[0].template.answers: unknown key 'answers' in a jinja template "
            "(allowed: answer_choices, id, jinja)",
        ),
        (
            {"jinja": RTE_JINJA, "promptsource": "super_glue/rte"},
            "m.yaml: tasks[0].template: a template needs exactly one of 'jinja', "
            "'promptsource' or 'catalogue' (got jinja, promptsource)",
        ),
        (
            42,
            "m.yaml: tasks[0].template: a template is a catalogue name, {jinja: ...}, "
            "{promptsource: ..., name: ...} or {catalogue: ...}, not int",
        ),
        (
            {"jinja": RTE_JINJA, "answer_choices": 3},
            "m.yaml: tasks[0].template.answer_choices: 'answer_choices' must be a string like "
            "'True ||| False' or a list of strings",
        ),
    ],
)
def test_malformed_specs_name_the_key(spec, message):
    with pytest.raises(UserError) as err:
        load_template(spec, file="m.yaml", key="tasks[0].template")
    assert str(err.value) == message


# -- catalogue and registry --------------------------------------------------------------------


def test_catalogue_template_by_name_or_mapping():
    assert load_template("rte") == load_template({"catalogue": "rte"}) == get_template("rte")
    assert load_template("rte").apply(PAPER_CASES["rte"][0])[1] == "False"


def test_unknown_catalogue_template_suggests_close_names():
    with pytest.raises(UserError) as err:
        load_template("rtee", file="m.yaml", key="tasks[0].template")
    assert str(err.value).startswith(
        "m.yaml: tasks[0].template: unknown catalogue template 'rtee'; did you mean rte"
    )
    with pytest.raises(UserError, match=r"^m.yaml: tasks\[0\].template.catalogue: unknown"):
        load_template({"catalogue": "nope_nope"}, file="m.yaml", key="tasks[0].template")


def test_register_template_shadows_and_resets():
    mine = register_template(Template("my_fmt", "In: {{x}} ||| {{y}}"))
    assert get_template("my_fmt") is mine
    assert "my_fmt" in list_templates() and "rte" in list_templates()
    reset_templates()
    with pytest.raises(UserError, match="unknown catalogue template 'my_fmt'"):
        get_template("my_fmt")


def test_to_dict_round_trips():
    template = _inline()
    assert template.to_dict() == {
        "id": "my_rte",
        "jinja": RTE_JINJA,
        "answer_choices": "True ||| False",
    }
    assert load_template(template.to_dict()) == template


def test_templates_pickle_for_worker_processes():
    template = get_template("rte")
    copy = pickle.loads(pickle.dumps(template))
    assert copy == template and copy.key == "tasks[0].template"
    example, expected_input, expected_target = PAPER_CASES["rte"]
    assert copy.apply(example) == (expected_input, expected_target)


# Each would take hours or gigabytes without the per-render meter; each is refused in well
# under a second with a message naming the limit.
RESOURCE_BOMBS = [
    (
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "loop iterations",
    ),
    (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "loop iterations",
    ),
    (
        "{% set n = namespace(s='x') %}{% for i in range(40) %}{% set n.s = n.s ~ n.s %}"
        "{% endfor %}{{ n.s }}",
        "'~' would build",
    ),
    (
        "{% set n = namespace(s='x') %}{% for i in range(40) %}{% set n.s = n.s + n.s %}"
        "{% endfor %}{{ n.s }}",
        "'+' would build",
    ),
    ("{{ ''|center(10**9) }}", "center filter with a width"),
    ("{{ ''|indent(10**9) }}", "indent filter with a width"),
    ("{{ ''.ljust(10**9) }}", "str.ljust with a width"),
    ("{{ '%0999999999d'|format(1) }}", "format width"),
    ("{{ '%0999999999d' % 1 }}", "format width"),
    ("{{ '%*d' % (10**9, 1) }}", "width of 1000000000"),
    ("{{ '{:>{}}'.format(1, 10**9) }}", "width of 1000000000"),
    ("{{ ([('x' * 1000000)] * 1000000)|join }}", "join filter would build"),
    ("{{ ('x' * 1000000).replace('x', 'x' * 1000000) }}", "str.replace would build"),
    ("{{ ('x' * 1000000)|replace('x', 'x' * 1000000) }}", "replace filter would build"),
]


@pytest.mark.parametrize(("jinja", "message"), RESOURCE_BOMBS)
def test_a_template_that_would_exhaust_time_or_memory_is_stopped(jinja, message):
    template = Template(
        "bomb", jinja + " ||| {{ label }}", file="mix.yaml", key="tasks[0].template"
    )
    with pytest.raises(UserError, match="per render") as info:
        template.apply({"text": "t", "label": 0})
    assert message in str(info.value)
    assert str(info.value).startswith("mix.yaml: tasks[0].template: template 'bomb'")


def test_the_render_stops_past_the_output_size(monkeypatch):
    """The rendered text is streamed and stopped past the bound, before it is joined."""
    monkeypatch.setattr("multipromot.data.templates._MAX_CHARS", 1000)
    template = Template("t", "{% for i in range(5000) %}x{% endfor %} ||| y")
    with pytest.raises(UserError, match="rendered more than 1,000 characters"):
        template.apply({})
    assert Template("t", "{% for i in range(900) %}x{% endfor %} ||| y").apply({})[0] == "x" * 900


def test_the_render_stops_at_its_deadline(monkeypatch):
    """A macro calling itself twice per level does 2**40 calls in few loop iterations: the
    wall-time deadline (not the step count) ends it."""
    monkeypatch.setattr("multipromot.data.templates._MAX_SECONDS", 0.2)
    jinja = (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }} ||| y"
    )
    with pytest.raises(UserError, match=r"took more than 0.2 s"):
        Template("t", jinja).apply({})


def test_metering_keeps_what_templates_render():
    """Loops (with loop.*), '~', '+', '%', join, replace, padding and format read the same."""
    jinja = (
        "{% for c in ['a', 'b'] %}{{ c }}{{ loop.index }}/{{ loop.length }}"
        "{% if loop.last %}!{% endif %}{% endfor %} {{ text ~ '!' }} {{ text + '?' }} "
        "{{ [text, 'x']|join(', ') }} {{ '%05d' % 3 }} {{ '{:,}'.format(8000000000) }} "
        "{{ text|replace('l', 'L') }} [{{ text|center(9) }}] {{ '%s-%s'|format(1, 2) }} "
        "||| {{ answer_choices[label] }}"
    )
    template = Template("ok", jinja, "no ||| yes")
    assert template.apply({"text": "hello", "label": 1}) == (
        "a1/2b2/2! hello! hello? hello, x 00003 8,000,000,000 heLLo [  hello  ] 1-2",
        "yes",
    )
