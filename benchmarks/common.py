"""Shared by the benchmark scripts: synthetic data, models from config, timing, RESULTS.md.

No network: the text is made-up words drawn from a Zipf distribution, with per-task lengths
close to the real datasets' (in tokens of a word-level tokenizer, one word = one token), so
padding and sequence lengths behave like RTE, XSum, TriviaQA, ... without downloading them.
The templates are the paper's (multipromot/catalogue/paper.yaml).

Timing rule: arms are measured side by side in the same process, interleaved (A, B, A, B, ...:
whole runs, steps in lockstep, or batch by batch), many times over; a comparison is a ratio of
summed times over the repeats (or pairs) with a 95% bootstrap interval over them
(:func:`ratio`), and a target is judged from that interval (:class:`Target`). Each section
records the CPU, the load average at its start and end, and the CPU that other processes used
while it ran (:class:`Load`): a figure taken next to a busy job measures that job as well.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics  # noqa: F401  (scripts use C.statistics)
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from intervals import REFERENCE, Estimate, Target, mean, median, ratio  # noqa: E402, F401

# One thread per process: on 2 cores shared with other jobs, a second OpenMP thread made every
# kernel 2-5x slower (measured: fwd+bwd 0.7 s at 1 thread, 2.9-4.7 s at 2), and it is what
# the FSDP benchmark runs per rank anyway.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGETS = Path(__file__).with_name("targets.json")

# -- data ------------------------------------------------------------------------------------

VOCAB_WORDS = 8000
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["ka", "lo", "mi", "ten"]


def words() -> list[str]:
    """The made-up vocabulary, most frequent first (deterministic)."""
    rng = np.random.default_rng(1234)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < VOCAB_WORDS:
        n = 1 + min(int(rng.exponential(1.2)), 4)
        w = "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=n))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class TextMaker:
    """Sentences of Zipf-distributed made-up words with lognormal lengths."""

    def __init__(self, seed: int):
        self.vocab = np.array(words())
        p = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.1
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)

    def span(self, typical: float, sigma: float = 0.4, lo: int = 1, hi: int = 1000) -> str:
        """``typical`` words (the median length), lognormal spread ``sigma``, within lo..hi."""
        n = int(np.clip(round(typical * math.exp(sigma * self.rng.standard_normal())), lo, hi))
        return " ".join(self.rng.choice(self.vocab, size=n, p=self.p))

    def pick(self, n: int) -> int:
        return int(self.rng.integers(n))


# Paper templates (catalogue/paper.yaml); lengths in words: median, sigma, min, max, chosen to
# match the datasets' token statistics (RTE premise ~45 words, XSum document ~430 words, ...).
TASKS = {
    "rte": {
        "jinja": "{{premise}} question: {{hypothesis}} Is it true or false? answer: ||| "
        "{{answer_choices[label]}}",
        "answer_choices": "True ||| False",
        "metric": "accuracy",
        "make": lambda t: {
            "premise": t.span(43, 0.5, 8, 240),
            "hypothesis": t.span(9, 0.3, 3, 30),
            "label": t.pick(2),
        },
    },
    "cb": {
        "jinja": "{{premise}} question: {{hypothesis}} Is it true or false or neither? answer: "
        "||| {{answer_choices[label]}}",
        "answer_choices": "True ||| False ||| Neither",
        "metric": "accuracy",
        "make": lambda t: {
            "premise": t.span(60, 0.5, 10, 250),
            "hypothesis": t.span(8, 0.3, 2, 30),
            "label": t.pick(3),
        },
    },
    "snli": {
        "jinja": "{{premise}} question: {{hypothesis}} Is it true or false or neither? answer: "
        "||| {{answer_choices[label]}}",
        "answer_choices": "True ||| Neither ||| False",
        "metric": "accuracy",
        "make": lambda t: {
            "premise": t.span(13, 0.4, 3, 60),
            "hypothesis": t.span(7, 0.4, 2, 30),
            "label": t.pick(3),
        },
    },
    "wic": {
        "jinja": "{{sentence1}} {{sentence2}} question: The word {{word}} is used in the same "
        "way in the two sentences. Is it true or False? answer: ||| {{answer_choices[label]}}",
        "answer_choices": "False ||| True",
        "metric": "accuracy",
        "make": lambda t: {
            "sentence1": t.span(9, 0.4, 3, 40),
            "sentence2": t.span(9, 0.4, 3, 40),
            "word": t.span(1, 0, 1, 1),
            "label": t.pick(2),
        },
    },
    "trivia_qa": {
        "jinja": "Q: {{question}} A: ||| {{answer}}",
        "metric": "exact_match",
        "make": lambda t: {"question": t.span(14, 0.4, 4, 60), "answer": t.span(2, 0.4, 1, 8)},
    },
    "web_questions": {
        "jinja": "Q: {{question}} A: ||| {{answer}}",
        "metric": "exact_match",
        "make": lambda t: {"question": t.span(7, 0.3, 3, 20), "answer": t.span(2, 0.4, 1, 8)},
    },
    "wmt14_en_fr": {
        "jinja": "Translate English to French: {{en}} ||| {{fr}}",
        "metric": "bleu",
        "make": lambda t: {"en": t.span(25, 0.6, 3, 150), "fr": t.span(29, 0.6, 3, 170)},
    },
    "xsum": {
        "jinja": "Article: {{document}} One sentence summary: ||| {{summary}}",
        "metric": "rouge2",
        "make": lambda t: {
            "document": t.span(430, 0.55, 50, 2000),
            "summary": t.span(22, 0.3, 8, 60),
        },
    },
}
PAPER8 = list(TASKS)


def task_name(fmt: str, copy: int | None = None) -> str:
    """The benchmark's name for a task of format ``fmt`` (``bench_rte``, or ``bench_rte_3`` for
    a copy): inline tasks may not take a catalogue task's name (the bank keys prompts by name)."""
    return f"bench_{fmt}" if copy is None else f"bench_{fmt}_{copy}"


def write_mixture(
    root: Path,
    names: list[str],
    *,
    train: int = 200,
    validation: int = 16,
    shots: int = 0,
    seed: int = 0,
    copies: int = 1,
) -> Path:
    """JSON-lines data for ``names`` and a mixture YAML over them (equal rates); returns the YAML.

    The tasks are inline tasks with the paper's templates, read from local files: what a user
    with their own data writes, named by :func:`task_name` (``bench_rte``). ``copies`` > 1 makes
    that many tasks of each format (``bench_rte_0``, ``bench_rte_1``, ...; each its own data and
    bank prompt): the many-tasks regime.
    """
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    tasks = [
        (task_name(fmt, None if copies == 1 else k), fmt) for fmt in names for k in range(copies)
    ]
    for i, (name, fmt) in enumerate(tasks):
        spec = TASKS[fmt]
        maker = TextMaker(seed * 1000 + i)
        files = {}
        for split, n in (("train", train), ("validation", validation)):
            path = root / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(spec["make"](maker)) + "\n" for _ in range(n)))
            files[split] = path.name
        template = {"jinja": spec["jinja"]}
        if "answer_choices" in spec:
            template["answer_choices"] = spec["answer_choices"]
        source = {"files": files, "format": "json"}
        entries.append(
            {
                "name": name,
                "rate": 1.0,
                "metric": spec["metric"],
                "source": source,
                "template": template,
            }
        )
    mixture = {
        "name": "bench",
        "version": 1,
        "exemplars": {"shots": shots, "seed": 0},
        "tasks": entries,
    }
    path = root / "mixture.yaml"
    path.write_text(json.dumps(mixture, indent=1))  # JSON is YAML
    return path


def load_tasks(mixture_yaml: Path):
    from multipromot.data.mixtures import load_mixture

    return load_mixture(mixture_yaml)


# -- tokenizer and models --------------------------------------------------------------------


def tokenizer():
    """A word-level T5 tokenizer over the made-up vocabulary (every word is one token)."""
    import string

    from transformers import T5Tokenizer

    # Template words first (as a real vocabulary has them), then the made-up words.
    literal = " ".join(s["jinja"] + " " + s.get("answer_choices", "") for s in TASKS.values())
    fixed = sorted(set(re.findall(r"[A-Za-z]+", re.sub(r"{{.*?}}", " ", literal))))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -2.0) for w in fixed]
    vocab += [("▁" + w, -math.log(i + 2)) for i, w in enumerate(words()) if w not in fixed]
    vocab += [(c, -30.0) for c in sorted(set(string.printable) - set(string.whitespace))]
    vocab += [("▁", -30.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


# T5 shapes (vocab 32,128 as in t5-small/base, whatever the tokenizer's size).
T5_SHAPES = {
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-mini": dict(d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8),
    "t5-tiny": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4),
}


def t5_model(shape: str, tok, seed: int = 0, dropout: float = 0.0, embed_scale: float = 1.0):
    """A random-init T5ForConditionalGeneration of a named shape (no download).

    ``embed_scale`` < 1 shrinks the (tied) embeddings: at the default init the input embedding
    dominates the decoder's residual stream, so greedy decoding repeats the start token for
    every input; at 0.3 the outputs depend on the input (needed to compare generations).
    """
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=32128,
        dropout_rate=dropout,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        **T5_SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    if embed_scale != 1.0:
        with torch.no_grad():
            model.shared.weight.mul_(embed_scale)
    return model


def save_bench_model(shape: str, out: Path, seed: int = 0, embed_scale: float = 1.0) -> Path:
    """Build a model + tokenizer and save them where ``from_pretrained`` (and configs) load them."""
    from multipromot.models import save_model

    tok = tokenizer()
    if not (out / "multipromot.json").is_file():
        model = t5_model(shape, tok, seed, embed_scale=embed_scale)
        save_model(model, tok, out, name=f"bench-{shape}")
    return out


def make_bank(model_dir: Path, tasks: list[str], prompt_length: int, out: Path) -> Path:
    """A bank with one prompt per task (drawn, not trained) for the model in ``model_dir``."""
    from multipromot.bank import PromptBank, describe_model
    from multipromot.models import load_model
    from multipromot.soft_prompt import init_prompts

    model, tok, _ = load_model(str(model_dir))
    table = init_prompts(model, tok, len(tasks), prompt_length, method="vocab")
    bank = PromptBank(out)
    base = describe_model(model, name=str(model_dir))
    for task, prompt in zip(tasks, table, strict=True):
        bank.add(task, prompt, base_model=base)
    return out


def stage2_config(
    path: Path, *, model: Path, bank: Path, mixture: Path, out: Path, **stage2
) -> Path:
    """A run config for ``multipromot stage2`` (no validation, one checkpoint at the end)."""
    s2 = {
        "mixture": str(mixture),
        "mode": "promot",
        "shots": 0,
        "optimizer": "adafactor",
        "lr": 1e-3,
        "batch_size": 8,
        "max_grad_norm": 1.0,
        "label_smoothing": 0.1,
        "bf16": "false",
        "save_every": 100000,
        "eval_every": 0,
        "keep_best_by": "none",
        "max_input_length": 512,
        "max_target_length": 128,
        "log_every": 10,
        **stage2,
    }
    config = {
        "seed": 0,
        "out_dir": str(out),
        "model": str(model),
        "bank": {"dir": str(bank)},
        "stage2": s2,
    }
    path.write_text(json.dumps(config, indent=1))
    return path


class StepClock:
    """Stands in for ``training.Throughput`` in a stage loop: records when each step ends (and,
    with ``rss=True``, the process's resident memory then)."""

    rss = False

    def __init__(self, window: int = 20):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []
        self.rss_bytes: list[int] = []
        StepClock.last = self

    def update(self, tokens: int) -> float:
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())
        if StepClock.rss:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            self.rss_bytes.append(pages * os.sysconf("SC_PAGE_SIZE"))
        return 0.0

    def step_times(self) -> list[float]:
        return list(np.diff([self.start, *self.marks]))


def params_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# -- timing ----------------------------------------------------------------------------------


def interleaved(arms: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run the arms in turn, A, B, ..., A, B, ..., ``repeats`` times; collect their results.

    Each arm returns a dict of measurements for one repeat.
    """
    out: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(repeats):
        for name, fn in arms.items():
            out[name].append(fn())
            shown = {k: v for k, v in out[name][-1].items() if isinstance(v, (int, float, str))}
            line = ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
            print(f"  [{name} #{r + 1}] {line}", flush=True)
    return out


def interleaved_batches(
    arms: dict, count: int, repeats: int, label: str = ""
) -> dict[str, list[dict]]:
    """Time generation arms batch by batch, arm after arm, so that they see the same machine
    load. ``arms``: name -> (run(rows) -> one output per row, that arm's batches of row ids);
    every arm covers the same ``count`` rows. The next batch is always the one of the arm
    furthest behind (by rows done), so arms with few large batches and arms with many small
    ones progress together; ties go to the arms in turn, their order reversed every other
    repeat. Per arm and repeat: ``s`` and ``cpu`` (summed over its batches), ``ex_per_s``,
    ``ex_per_cpu_s`` and ``out`` (row id -> output), for the callers' identical-output checks.
    """
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(repeats):
        names = list(arms) if r % 2 == 0 else list(reversed(arms))
        wall, cpu = dict.fromkeys(arms, 0.0), dict.fromkeys(arms, 0.0)
        outs: dict[str, dict] = {a: {} for a in arms}
        done, nxt = dict.fromkeys(arms, 0), dict.fromkeys(arms, 0)
        while True:
            pending = [a for a in names if nxt[a] < len(arms[a][1])]
            if not pending:
                break
            name = min(pending, key=lambda a: done[a])  # min keeps the first of equals
            run, batches = arms[name]
            rows = batches[nxt[name]]
            with Clock() as c, torch.inference_mode():
                ids = run(rows)
            wall[name] += c.s
            cpu[name] += c.cpu
            outs[name].update(zip(rows, ids, strict=True))
            done[name] += len(rows)
            nxt[name] += 1
        for name in arms:
            runs[name].append(
                {
                    "s": wall[name],
                    "cpu": cpu[name],
                    "ex_per_s": count / wall[name],
                    "ex_per_cpu_s": count / cpu[name],
                    "out": outs[name],
                }
            )
        print(
            f"  [{label}repeat {r + 1}] "
            + ", ".join(f"{a} {count / wall[a]:.1f} ex/s" for a in arms),
            flush=True,
        )
    return runs


def speedups(runs: dict[str, list[dict]], base: str, key: str = "s") -> dict[str, Estimate]:
    """Each arm's speed over ``base``'s on the same rows: base time / arm time summed over the
    repeats (``key``: ``s`` wall, ``cpu`` CPU time), with 95% intervals over the repeats."""
    ref = [r[key] for r in runs[base]]
    return {
        name: ratio(ref, [r[key] for r in res]) if name != base else REFERENCE
        for name, res in runs.items()
    }


def assert_same_outputs(runs: dict[str, list[dict]], reference: str) -> int:
    """Every arm's outputs equal ``reference``'s first repeat's, row by row, in every repeat;
    returns the number of rows compared per repeat."""
    ref = runs[reference][0]["out"]
    for name, results in runs.items():
        for i, res in enumerate(results):
            assert res["out"].keys() == ref.keys(), f"{name}, repeat {i + 1}: other rows"
            differ = sum(res["out"][k] != ref[k] for k in ref)
            assert differ == 0, f"{name}, repeat {i + 1}: {differ} rows differ from {reference}"
    return len(ref)


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def quantile(xs: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(xs), q))


class Clock:
    """``with Clock() as c: ...`` then ``c.s`` = elapsed wall seconds, ``c.cpu`` = CPU seconds
    of this process (with one thread: the work done, without waiting for a busy core)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


# -- reporting -------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table (printed by the scripts and written to RESULTS.md)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name, vector extensions and cache sizes: the ratios depend on them (a
    batch that fits one machine's caches spills on another)."""
    cpu = platform.processor() or "cpu"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
    if not isa and "avx2" in flags:
        isa = ["AVX2"]
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if level in ("2", "3") and kind == "Unified":
            caches.append(f"L{level} {size}")
    extra = ", ".join(isa + caches)
    return f"{cpu} ({extra})" if extra else cpu


def machine() -> str:
    import peft
    import transformers

    return (
        f"{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} cores "
        f"(torch threads {torch.get_num_threads()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}"
    )


def _busy_ticks() -> int | None:
    """All CPUs' busy time since boot, in clock ticks (/proc/stat); None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


class Load:
    """How busy the machine was while a benchmark ran: load averages at the start and the end,
    and the CPU (in cores) that other processes used meanwhile (all CPUs' busy time from
    /proc/stat, less this process's and its children's)."""

    def __init__(self):
        self.load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        self.t0, self.ticks0, self.own0 = time.perf_counter(), _busy_ticks(), self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        ticks = _busy_ticks()
        others = float("nan")
        if ticks is not None and self.ticks0 is not None and wall > 0:
            busy = (ticks - self.ticks0) / os.sysconf("SC_CLK_TCK")
            others = max(0.0, busy - (self._own() - self.own0)) / wall
        self.result = {
            "load_start": self.load_start,
            "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "others_cores": others,
            "minutes": wall / 60,
        }
        return self.result

    def line(self) -> str:
        r = getattr(self, "result", None) or self.stop()
        quiet = "quiet" if r["others_cores"] < 0.25 else "shared"
        return (
            f"load avg {r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end; other "
            f"processes used {r['others_cores']:.2f} of {os.cpu_count()} cores on average "
            f"({quiet}); {r['minutes']:.1f} min"
        )


def record(
    key: str,
    title: str,
    body: str,
    machine_line: str,
    load: Load | None = None,
    targets: Sequence[Target] = (),
    command: str | None = None,
) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, store its targets' verdicts
    in targets.json, and print both (print only with BENCH_NO_RECORD=1 in the environment)."""
    run = machine_line + (f"; {load.line()}" if load is not None else "")
    command = command or f".venv/bin/python benchmarks/{key}.py"
    verdicts = ""
    if targets:
        verdicts = "\n\nTargets (judged from the 95% interval):\n\n" + table(
            ["target", "measured (95% CI)", "verdict"],
            [[t.what, str(t.estimate), t.verdict()] for t in targets],
        )
    section = (
        f"<!-- bench:{key} -->\n## {title}\n\n"
        f"Run: {run}. Command: `{command}`.\n\n"
        f"{body.strip()}{verdicts}\n<!-- /bench:{key} -->\n"
    )
    print("\n" + section)
    if os.environ.get("BENCH_NO_RECORD"):  # a trial run: print, leave the files alone
        return
    text = RESULTS.read_text() if RESULTS.exists() else _RESULTS_HEAD
    pattern = re.compile(
        rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->\n", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
    if targets:
        stored = json.loads(TARGETS.read_text()) if TARGETS.exists() else {}
        for t in targets:
            stored[t.key] = {
                **t.as_json(),
                "script": key,
                "run": run,
                "load": getattr(load, "result", None),
            }
        TARGETS.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")


_RESULTS_HEAD = """# Benchmark results

Recorded by the scripts in this folder: `make bench` (= `.venv/bin/python benchmarks/run_all.py`)
runs all CPU benchmarks one after the other in about 20-30 minutes (`stage2_overhead`, 120
step pairs, about half of it) and rewrites each script's
section below; `run_all.py NAME ...` runs some. Comparisons are measured side by side in one
process, interleaved (A, B, A, B, ...: whole runs, steps in lockstep, or batch by batch), and
reported as ratios of medians. The machine is 2 CPU cores shared with other jobs: absolute
numbers move with the load (the load average at the start is in each section), ratios much
less; where it matters the table also gives CPU time of the (single-threaded) process, which
leaves out the time spent waiting for a core. Models are random-init T5s built from config
(no downloads); data is synthetic text with the paper's templates and realistic lengths
(`benchmarks/common.py`).

## 8. GPU

Not measured: no GPU was lent to this work, and no number here comes from one. The stage-2
tokens/s and MFU in bf16 with NCCL for a ~1B model on one H100/H200 against the same plain loop
(issue 7, item 8) remain to be run where a GPU is available; `stage2_overhead.py` is the CPU
version of that comparison.
"""


def mixed_requests(mix, per_task: int) -> list:
    """``per_task`` validation inputs of every task of ``mix`` as generation rows (task id =
    its index), shuffled with a fixed seed: requests that arrive with their tasks mixed."""
    from multipromot.data.exemplars import build_item

    items = [
        build_item(task, i, split="validation", task_id=t)
        for t, task in enumerate(mix.tasks)
        for i in range(min(per_task, len(task.examples("validation"))))
    ]
    order = np.random.default_rng(0).permutation(len(items))
    return [items[i] for i in order]
