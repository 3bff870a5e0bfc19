"""Router: latency per input and throughput with a 100-entry bank.

100 distinct template formats are generated in four families modelled on the paper's templates
(classification with an answer set, QA, translation, summarization with XSum-long inputs),
each with its own literal words. 90 entries carry their template's signature; 10 have none
and are routed by the similarity fallback from 8 example inputs each. The traffic mixes 0-shot
inputs of bank tasks (60%), 1-shot prompts of bank tasks (20%) and inputs of 20 formats the
bank does not hold (20%, must get no prompt).

Latency: `Router.route([text])` one input at a time (p50 / p99 over all inputs). Throughput:
`Router.route(texts)` on the whole traffic at once. Build: `Router(entries, negatives)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

BANK = 100
UNSIGNED = 10
OTHER = 20
TRAFFIC = 600
REPEATS = 8

_LITERALS = str.split(
    "question answer claim premise statement passage context article text summary translate "
    "english french german romanian query response choose option label decide review topic "
    "headline title sentence document input output solve problem result category sentiment "
    "opinion reason evidence source target meaning word phrase paragraph story news report "
    "describe explain classify rewrite paraphrase complete continue given following below above "
    "true false maybe neither yes no positive negative neutral correct incorrect right wrong "
    "agree disagree entails contradicts unrelated first second third final brief short long"
)


def _cls(t, answers: int) -> dict:
    return {
        "premise": t.span(43, 0.5, 8, 240),
        "hypothesis": t.span(9, 0.3, 3, 30),
        "label": t.pick(answers),
    }


def _qa(t) -> dict:
    return {"question": t.span(14, 0.4, 4, 60), "answer": t.span(2, 0.4, 1, 8)}


def _mt(t) -> dict:
    return {"src": t.span(25, 0.6, 3, 150), "tgt": t.span(29, 0.6, 3, 170)}


def _summ(t) -> dict:
    return {"document": t.span(430, 0.55, 50, 2000), "summary": t.span(22, 0.3, 8, 60)}


def templates(n: int, seed: int) -> list:
    """``n`` distinct (Template, example maker) pairs, cycling through the four families."""
    from functools import partial

    import numpy as np

    from multipromot.data.templates import Template

    rng = np.random.default_rng(seed)
    seen, out = set(), []

    def lit(k: int, cap: bool = False) -> str:
        words = " ".join(str(w) for w in rng.choice(_LITERALS, size=k, replace=False))
        return words.capitalize() if cap else words

    while len(out) < n:
        family, answers = len(out) % 4, None
        if family == 0:
            k = int(rng.integers(2, 4))
            answers = " ||| ".join(w.capitalize() for w in lit(k).split())
            jinja = f"{{{{premise}}}} {lit(2)}: {{{{hypothesis}}}} {lit(2)}? {lit(1)}: ||| "
            jinja += "{{answer_choices[label]}}"
            make = partial(_cls, answers=k)
        elif family == 1:
            jinja, make = (
                f"{lit(1, True)}: {{{{question}}}} {lit(1, True)}: ||| {{{{answer}}}}",
                _qa,
            )
        elif family == 2:
            jinja, make = f"{lit(3, True)}: {{{{src}}}} ||| {{{{tgt}}}}", _mt
        else:
            jinja = f"{lit(1, True)}: {{{{document}}}} {lit(3)}: ||| {{{{summary}}}}"
            make = _summ
        if jinja not in seen:
            seen.add(jinja)
            out.append((Template(f"t{len(out)}", jinja, answers), make))
    return out


def main() -> None:
    import numpy as np

    from multipromot.features import SEPARATOR
    from multipromot.router import Router, RouterEntry

    machine, load = C.machine(), C.Load()
    formats = templates(BANK + OTHER, seed=0)
    bank, other = formats[:BANK], formats[BANK:]
    text = C.TextMaker(7)
    rng = np.random.default_rng(1)

    def sample(fmt) -> tuple[str, str]:
        template, make = fmt
        return template.apply(make(text))

    entries = []
    for i, (template, make) in enumerate(bank):
        signature = None if i < UNSIGNED else template.signature
        examples = [sample((template, make))[0] for _ in range(8)]
        entries.append(RouterEntry(f"task{i:03d}", signature, examples))
    negatives = [sample(other[j % OTHER])[0] for j in range(40)]

    traffic: list[tuple[str, str | None]] = []
    for _ in range(TRAFFIC):
        u = rng.random()
        if u < 0.8:
            i = int(rng.integers(BANK))
            x, _ = sample(bank[i])
            if u >= 0.6:  # 1-shot: an exemplar of the same task first
                ex, target = sample(bank[i])
                x = f"{ex} {target}{SEPARATOR}{x}"
            traffic.append((x, f"task{i:03d}"))
        else:
            traffic.append((sample(other[int(rng.integers(OTHER))])[0], None))
    texts = [x for x, _ in traffic]

    def build() -> dict:
        with C.Clock() as c:
            router = Router(entries, negatives)
        build.router = router
        return {"s": c.s}

    build()

    def single() -> dict:
        import time

        lat = []
        for x in texts:
            t0 = time.perf_counter()
            build.router.route([x])
            lat.append(time.perf_counter() - t0)
        return {"p50_ms": C.quantile(lat, 0.5) * 1e3, "p99_ms": C.quantile(lat, 0.99) * 1e3}

    def batch() -> dict:
        with C.Clock() as c:
            routes = build.router.route(texts)
        batch.routes = routes
        return {"s": c.s, "per_s": len(texts) / c.s}

    runs = C.interleaved({"build": build, "single": single, "batch": batch}, REPEATS)
    routes = batch.routes
    right = sum(r.task == want for r, (_, want) in zip(routes, traffic, strict=True))
    kinds = {"0-shot bank": [], "1-shot bank": [], "not in bank": []}
    for r, (x, want) in zip(routes, traffic, strict=True):
        kind = (
            "not in bank" if want is None else ("1-shot bank" if SEPARATOR in x else "0-shot bank")
        )
        kinds[kind].append(r.task == want)
    lengths = [len(x.split()) for x in texts]
    load.stop()
    rows = [
        [
            BANK,
            str(C.median([r["s"] * 1e3 for r in runs["build"]])),
            str(C.median([r["p50_ms"] for r in runs["single"]])),
            str(C.median([r["p99_ms"] for r in runs["single"]])),
            str(C.median([r["per_s"] for r in runs["batch"]])),
        ]
    ]
    body = (
        f"{BANK} bank entries ({BANK - UNSIGNED} with a template signature, {UNSIGNED} routed "
        f"by the similarity fallback), traffic of {len(texts)} inputs (median "
        f"{int(np.median(lengths))} words, max {max(lengths)}): 0-shot and 1-shot inputs of "
        f"bank tasks and inputs of {OTHER} formats outside the bank. Median of {REPEATS} "
        f"interleaved repeats with its 95% bootstrap interval; one Python thread.\n\n"
        + C.table(
            [
                "bank entries",
                "build ms",
                "latency p50 ms",
                "latency p99 ms",
                "throughput inputs/s (one batch)",
            ],
            rows,
        )
        + f"\n\nRouting decisions (sanity, not a quality benchmark): {right}/{len(texts)} "
        f"as intended; " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in kinds.items()) + "."
    )
    C.record("router", "6. Router latency and throughput (100-entry bank)", body, machine, load)


if __name__ == "__main__":
    main()
