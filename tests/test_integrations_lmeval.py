"""lm-evaluation-harness: the `multipromot` model type scores what multipromot scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from multipromot.bank import PromptBank  # noqa: E402
from multipromot.bank.entry import describe_model, format_record  # noqa: E402
from multipromot.config import load_config  # noqa: E402
from multipromot.data.collate import Collator  # noqa: E402
from multipromot.data.mixtures import load_mixture  # noqa: E402
from multipromot.errors import UserError  # noqa: E402
from multipromot.eval.generation import predict  # noqa: E402
from multipromot.experiment import run_eval  # noqa: E402
from multipromot.features import Item  # noqa: E402
from multipromot.integrations.lmeval import MultiPromotLM  # noqa: E402
from multipromot.integrations.lmeval.__main__ import main as lmeval_main  # noqa: E402
from multipromot.integrations.lmeval.model import _item  # noqa: E402
from multipromot.models import load_model  # noqa: E402
from multipromot.soft_prompt import PromptedModel  # noqa: E402

SIGNED = {
    "template": "t",
    "answer_choices": None,
    "signature": {"pieces": [" answer:"], "answers": None},
}


def _bank_with_prompt(tmp_path: Path, name: str, task: str = "toy", fmt: dict | None = None):
    """A bank holding one random prompt for ``task``, trained (so it says) on built-in ``name``."""
    model, _, path = load_model(name)
    bank = PromptBank(tmp_path / f"bank-{name}")
    torch.manual_seed(1)
    prompt = torch.randn(4, model.get_input_embeddings().weight.shape[1])
    bank.add(task, prompt, base_model=describe_model(model, name=path), format=fmt or SIGNED)
    return bank


def _ll(context: str, continuation: str) -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0)


def _direct_logprob(prompted: PromptedModel, tok, context: str, continuation: str, row: int):
    """The continuation's log-prob computed by hand: byte tokens, one forward, a sum."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    task_ids = torch.tensor([row])
    if prompted.is_encoder_decoder:
        ids = torch.tensor([ctx + [tok.eos_token_id]])
        out = prompted(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            labels=torch.tensor([cont]),
            task_ids=task_ids,
        )
        logprobs = out.logits.float().log_softmax(-1)[0]
    else:
        ids = torch.tensor([(ctx + cont)[:-1]])
        out = prompted(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=task_ids)
        logprobs = out.logits.float().log_softmax(-1)[0, -len(cont) :]
    return float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2", "tiny-llama"])
def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs(tmp_path, name):
    bank = _bank_with_prompt(tmp_path, name)
    forced = MultiPromotLM(pretrained=name, bank=str(bank.root), task="toy")
    bare = MultiPromotLM(pretrained=name)
    model, tok, _ = load_model(name)
    model.eval()
    with_prompt = PromptedModel.from_bank(model, bank, ["toy"])
    context, continuation = "Is the sky blue? answer:", " yes"
    [(got_prompted, _)] = forced.loglikelihood([_ll(context, continuation)])
    [(got_bare, _)] = bare.loglikelihood([_ll(context, continuation)])
    with torch.no_grad():
        want_prompted = _direct_logprob(with_prompt, tok, context, continuation, 0)
        want_bare = _direct_logprob(with_prompt, tok, context, continuation, -1)
    assert got_prompted == pytest.approx(want_prompted, abs=1e-4)
    assert got_bare == pytest.approx(want_bare, abs=1e-4)
    assert abs(got_prompted - got_bare) > 1e-3  # the prompt was used, and only where asked


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_router_gives_matching_requests_the_prompt_and_others_none(tmp_path, name):
    bank = _bank_with_prompt(tmp_path, name)
    routed = MultiPromotLM(pretrained=name, bank=str(bank.root), router=True, batch_size=2)
    forced = MultiPromotLM(pretrained=name, bank=str(bank.root), task="toy")
    bare = MultiPromotLM(pretrained=name, bank=str(bank.root))  # prompts loaded, none used
    requests = [
        _ll("Is it? answer:", " yes"),
        _ll("Translate: cat", " chat"),
        _ll("Why not? answer:", " no"),
        _ll("", "a whole text"),
    ]
    assert routed.route([r.args[0] for r in requests]) == ["toy", None, "toy", None]
    got = routed.loglikelihood(requests)
    want = [
        forced.loglikelihood([requests[i]])[0]
        if i in (0, 2)
        else bare.loglikelihood([requests[i]])[0]
        for i in range(len(requests))
    ]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    # batched (mixed prompted and bare rows, batch_size 2) equals one request at a time
    one_by_one = [routed.loglikelihood([r])[0][0] for r in requests]
    assert [g[0] for g in got] == pytest.approx(one_by_one, abs=1e-4)
    gen = [
        Instance(
            "generate_until", {}, (r.args[0] or "x", {"until": ["\n\n"], "max_gen_toks": 5}), 0
        )
        for r in requests
    ]
    assert routed.generate_until(gen) == [routed.generate_until([g])[0] for g in gen]


def test_rolling_loglikelihood_adds_up_windows_without_scoring_a_token_twice(tmp_path):
    lm = MultiPromotLM(pretrained="tiny-gpt2", max_length=8)
    text = "a text longer than one window of eight tokens"
    [rolled] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # windows of 8 bytes, every byte scored once: the same as one pass conditioned on EOS
    # would give only with unlimited context, so check the count and sign instead of a value
    wide = MultiPromotLM(pretrained="tiny-gpt2", max_length=512)
    [whole] = wide.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    [(direct, _)] = wide.loglikelihood([_ll("", text)])
    assert whole == pytest.approx(direct, abs=1e-4)  # one window = "" -> text, EOS-conditioned
    assert rolled < 0 and rolled != pytest.approx(whole, abs=1e-4)  # cut context, other value


def test_bad_arguments_are_one_line_errors(tmp_path):
    bank = _bank_with_prompt(tmp_path, "tiny-gpt2")
    with pytest.raises(UserError, match="task 'nope' has no prompt"):
        MultiPromotLM(pretrained="tiny-gpt2", bank=str(bank.root), task="nope")
    with pytest.raises(UserError, match="router=true needs prompts"):
        MultiPromotLM(pretrained="tiny-gpt2", router=True)
    with pytest.raises(UserError, match="batch_size"):
        MultiPromotLM(pretrained="tiny-gpt2", batch_size="zero")
    lm = MultiPromotLM(pretrained="tiny-gpt2")
    sampled = Instance("generate_until", {}, ("x", {"do_sample": True}), 0)
    with pytest.raises(UserError, match="greedily"):
        lm.generate_until([sampled])
    assert lm.loglikelihood([_ll("some context", "")]) == [(0.0, True)]
    short = MultiPromotLM(pretrained="tiny-gpt2", max_length=4)
    with pytest.raises(UserError, match="longer than max_length=4"):
        short.loglikelihood([_ll("ctx", " a long continuation")])


# ----------------------------------------------------------------------------------------------
# The same items through `multipromot eval` and through lm-eval


QUESTIONS = [
    "where is the red box",
    "who wrote the note",
    "what is two and two",
    "when does it open",
    "why is it late",
    "how far is the lake",
]
MAX_NEW = 4


def _write_task_files(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """A JSONL dataset, a mixture over it, and an lm-eval task YAML over the same file.

    The answers of even items are what the model itself generates for them (found with
    multipromot's generation path before the files exist), the others "zzz": so the exact-match
    score is 50, not a vacuous 0, and only an lm-eval run that sees the same inputs and prompts
    reproduces it.
    """
    model, tok, path = load_model(name)
    model.eval()
    bank = PromptBank(tmp_path / "bank")
    torch.manual_seed(1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS)
    )
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        "name: lm_mix\nversion: 1\ntasks:\n  - name: lm_local\n"
        f"    source: {{files: {{train: {data}/train.jsonl, test: {data}/test.jsonl}}, "
        "format: json}\n"
        '    template: {jinja: "{{question}} answer: ||| {{answer}}"}\n'
        "    metric: exact_match\n"
    )
    (data / "test.jsonl").write_text((data / "train.jsonl").read_text())
    task = load_mixture(mixture).tasks[0]
    dim = model.get_input_embeddings().weight.shape[1]
    bank.add(
        "lm_local",
        torch.randn(4, dim),
        base_model=describe_model(model, name=path),
        format=format_record(task),
    )
    prompted = PromptedModel.from_bank(model, bank, ["lm_local"])
    decoder_only = not prompted.is_encoder_decoder
    collator = Collator(tok, decoder_only=decoder_only, for_generation=True)
    items = [Item(task_id=0, input=f"{q} answer:", target="") for q in QUESTIONS]
    outputs = predict(prompted, tok, items, collator, max_new_tokens=MAX_NEW)
    rows = [
        {"question": q, "answer": out if i % 2 == 0 else "zzz"}
        for i, (q, out) in enumerate(zip(QUESTIONS, outputs, strict=True))
    ]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    tasks_dir = tmp_path / "lm_tasks"
    tasks_dir.mkdir()
    # The metric is multipromot's own (post-processing + exact match), so what is compared is
    # the model outputs each harness gets, not two metric implementations.
    (tasks_dir / "utils.py").write_text(
        "from multipromot.data.metrics import postprocess, score\n\n"
        "def process_results(doc, results):\n"
        f"    pred = postprocess(results[0], {task.postprocess!r})\n"
        "    return {'score': score('exact_match', [pred], [doc['answer']])}\n"
    )
    (tasks_dir / "mp_local.yaml").write_text(
        "task: mp_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}/test.jsonl}}}}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}} answer:"\n'
        'doc_to_target: "{{answer}}"\n'
        f"generation_kwargs: {{until: ['<never>'], max_gen_toks: {MAX_NEW}, do_sample: false}}\n"
        "process_results: !function utils.process_results\n"
        "metric_list: [{metric: score, aggregation: mean, higher_is_better: true}]\n"
    )
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\nshots: [0]\nexamples: 1\ntasks: [lab_cb]\n")
    return mixture, suite, str(tasks_dir)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_lm_eval_scores_equal_multipromot_eval_on_the_same_items(tmp_path, name):
    mixture, suite, include = _write_task_files(tmp_path, name)
    cfg = load_config(
        None,
        [
            f"model={name}",
            f"out_dir={tmp_path / 'run'}",
            f"bank.dir={tmp_path / 'bank'}",
            f"stage2.mixture={mixture}",
            f"eval.suite={suite}",
            f"eval.examples={len(QUESTIONS)}",
            f"eval.max_new_tokens={MAX_NEW}",
            "eval.shots=[0]",
            "eval.router=false",
        ],
    )
    run_eval(cfg)
    records = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["records"]
    [ours] = [r for r in records if r["task"] == "lm_local"]
    assert ours["prompt"] == "lm_local" and ours["n"] == len(QUESTIONS)

    lm = MultiPromotLM(pretrained=name, bank=str(tmp_path / "bank"), router=True)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["mp_local"],
        task_manager=TaskManager(include_path=include, include_defaults=False),
        log_samples=True,
    )
    theirs = results["results"]["mp_local"]["score,none"]
    assert ours["score"] == pytest.approx(50.0)  # the even items, by construction
    assert theirs == pytest.approx(ours["score"])
    samples = results["samples"]["mp_local"]
    assert [s["arguments"][0][0] for s in samples] == [f"{q} answer:" for q in QUESTIONS]


@pytest.mark.parametrize("with_builtin_tasks", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_documented_command_runs_the_registered_model(tmp_path, monkeypatch, with_builtin_tasks):
    """`python -m multipromot.integrations.lmeval --model multipromot ...` (lm_eval's CLI)."""
    if not with_builtin_tasks:
        # Indexing lm-eval's thousands of built-in task files takes ~17 s here and is not what
        # is tested; the slow variant runs the command untouched.
        from lm_eval.tasks import manager

        init = manager.TaskManager.__init__

        def local_only(self, *args, **kwargs):
            init(self, *args, **{**kwargs, "include_defaults": False})

        monkeypatch.setattr(manager.TaskManager, "__init__", local_only)
    _, _, include = _write_task_files(tmp_path, "tiny-gpt2")
    out = tmp_path / "out"
    lmeval_main(
        [
            "--model",
            "multipromot",
            "--model_args",
            f"pretrained=tiny-gpt2,bank={tmp_path / 'bank'},router=true",
            "--tasks",
            "mp_local",
            "--include_path",
            include,
            "--output_path",
            str(out),
        ]
    )
    [written] = list(out.rglob("results_*.json"))
    result = json.loads(written.read_text())
    assert result["results"]["mp_local"]["score,none"] == pytest.approx(50.0)
    assert result["config"]["model"] == "multipromot"


@pytest.mark.slow  # ~9 s: calibration renders inputs of every local task
def test_router_without_a_signature_tells_the_task_from_other_local_formats(tmp_path):
    """A bank task with no format signature is routed by similarity, calibrated (as `route`
    does) against the other local tasks: its inputs get its prompt, other formats none."""
    from multipromot.data.exemplars import build_item
    from multipromot.data.tasks import get_task
    from multipromot.features import kshot_text

    bank = _bank_with_prompt(tmp_path, "tiny-gpt2", task="lab_rte", fmt={"signature": None})
    lm = MultiPromotLM(pretrained="tiny-gpt2", bank=str(bank.root), router=True)
    texts = {
        name: [kshot_text(build_item(get_task(name), i, split="test")) for i in range(5)]
        for name in ("lab_rte", "lab_qa", "lab_sentiment")
    }
    assert lm.route(texts["lab_rte"]) == ["lab_rte"] * 5
    assert lm.route(texts["lab_qa"] + texts["lab_sentiment"]) == [None] * 10


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_an_over_long_context_loses_whole_exemplars_first(name):
    """Contexts are read in multipromot's k-shot layout, so the Collator's truncation applies:
    the farthest exemplars go first, the input stays whole."""
    exemplars = ["first example True", "second example False", "third example True"]
    text = "the question answer:"
    full = "\n\n".join([*exemplars, text])
    kept = "\n\n".join([exemplars[-1], text])
    short = MultiPromotLM(pretrained=name, max_length=48)  # room for one exemplar and the input
    wide = MultiPromotLM(pretrained=name, max_length=512)
    ask = {"until": ["\n\n"], "max_gen_toks": 6}
    got = short.generate_until([Instance("generate_until", {}, (full, ask), 0)])
    want = wide.generate_until([Instance("generate_until", {}, (kept, ask), 0)])
    assert got == want
    # and the input the model got is the last exemplar and the input, not the context's head
    ids = short.gen_collator([_item(full, -1)])["input_ids"][0].tolist()
    assert short.tokenizer.decode(ids, skip_special_tokens=True) == kept
