"""Both conventions side by side on the embedded Gemma-3-270M (prunekit.conventions).

For every language and method: the perplexity, in that language, of the model pruned (50 %
unstructured) with calibration text in that language -- the diagonal of the study's Table 1 --
once with ``--conventions prunekit`` and once with ``--conventions study`` (calibration windows,
perplexity windows and thresholds all switched together), plus the dense model's perplexity under
each convention's windows. The model is loaded once and its dense weights restored between runs;
calibration, engine, methods and scoring are prunekit's own code.

    python benchmarks/bench_conventions.py --langs de,en,sw,zh --nsamples 12 --seqlen 64
"""

from __future__ import annotations

import argparse
import time

import torch

from prunekit.calibration import build_calibration_set
from prunekit.conventions import CONVENTIONS
from prunekit.engine import Engine
from prunekit.evaluation.perplexity import make_windows, perplexity
from prunekit.methods import get_method
from prunekit.models import load_model
from prunekit.recipe import Recipe, parse_pattern
from prunekit.textsources import load_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--langs", default="ar,de,en,es,ru,sw,zh")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--nsamples", type=int, default=12)
    parser.add_argument("--seqlen", type=int, default=64, help="calibration tokens per sequence (study: below the shortest long passage)")
    parser.add_argument("--eval-seqlen", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    langs = args.langs.split(",")
    methods = args.methods.split(",")

    started = time.perf_counter()
    model, tokenizer, _ = load_model(args.model, "float32")
    model.eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    texts = {lang: [d.text for d in load_texts("embedded", lang, "evaluation").documents] for lang in langs}
    windows = {(c, lang): make_windows(tokenizer, texts[lang], args.eval_seqlen, args.eval_windows, c) for c in CONVENTIONS for lang in langs}

    def ppl(convention: str, lang: str) -> float:
        return perplexity(model, windows[(convention, lang)], batch_size=4, progress=False).ppl

    table: dict[tuple[str, str, str], float] = {}
    for convention in CONVENTIONS:
        for lang in langs:
            table[("dense", convention, lang)] = ppl(convention, lang)
            print(f"dense     {convention:8s} eval={lang}: ppl {table[('dense', convention, lang)]:9.3f}", flush=True)
    for method in methods:
        for convention in CONVENTIONS:
            recipe = Recipe(method, pattern=parse_pattern(0.5), conventions=convention)
            for lang in langs:
                t0 = time.perf_counter()
                model.load_state_dict(dense)
                calib = build_calibration_set(tokenizer, lang, "embedded", args.nsamples, args.seqlen, args.seed, conventions=convention)
                Engine(get_method(method), recipe, "cpu").run(model, calib.input_ids)
                table[(method, convention, lang)] = ppl(convention, lang)
                print(f"{method:9s} {convention:8s} calib=eval={lang}: ppl {table[(method, convention, lang)]:9.3f}  "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.load_state_dict(dense)

    print(f"\nGemma-3-270M, 50% unstructured, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"first {args.eval_windows} windows of {args.eval_seqlen} tokens of the embedded held-out text; "
          f"diagonal: calibration language = evaluation language\n")
    header = "| model | conventions | " + " | ".join(langs) + " | mean |"
    print(header)
    print("|" + "---|" * (len(langs) + 3))
    for method in ["dense", *methods]:
        for convention in CONVENTIONS:
            values = [table[(method, convention, lang)] for lang in langs]
            print(f"| {method} | {convention} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values) / len(values):.2f} |")
    print("\nratio study / prunekit (pruned perplexity over the dense perplexity of the same windows):")
    for method in methods:
        ratios = []
        for lang in langs:
            rel = {c: table[(method, c, lang)] / table[("dense", c, lang)] for c in CONVENTIONS}
            ratios.append(rel["study"] / rel["prunekit"])
        print(f"  {method}: " + ", ".join(f"{lang} {r:.3f}" for lang, r in zip(langs, ratios)) + f"; mean {sum(ratios) / len(ratios):.3f}")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
