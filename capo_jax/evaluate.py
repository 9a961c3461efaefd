"""python -m capo_jax.evaluate: score a policy on named benchmarks (greedy pass@1, sampled avg@k and pass@k).

    python -m capo_jax.evaluate --model PATH --benchmarks math500,gsm8k,aime24,amc23 \\
        [--data_dir DIR] [--num_samples 8 --temperature 1.0] [--output results.json]

    python -m capo_jax.evaluate --model runs/demo --benchmarks arithmetic   # the demo's held-out problems

`--model` is a Hugging Face folder (config.json + safetensors + tokenizer) or a training workdir
(its orbax checkpoint `--step`, default the latest, through `capo_jax.export.load_policy`); from a
workdir the prompt template, chat settings, response budget and the arithmetic world come from
the run's stored config unless given here. Benchmarks come from `--data_dir/<name>.jsonl|json|parquet`
when present, else from the hub; `arithmetic` is the demo world's held-out split; `file:<path>`
scores any local question/answer file (fields from `--question_field` / `--answer_field`).
`--template` reads `\n` as a newline. Prints a table and writes a JSON file with every setting and metric.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from capo_jax.data.benchmarks import ARITHMETIC, REGISTRY, Benchmark, Item, load_benchmark, local_benchmark
from capo_jax.data.templates import check_template, encode_prompt, literal_newline_warning, read_escapes, render_prompt
from capo_jax.metrics import silence_torch_advisory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_for(n: int) -> list[int]:
    """The k values reported for n samples: powers of two up to n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return sorted(set(ks + [n]))


def score_benchmark(
    bench: Benchmark,
    items: Sequence[Item],
    greedy: Sequence[str] | None,
    samples: Sequence[Sequence[str]] | None,
    *,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Metrics of one benchmark from its responses: greedy accuracy, and avg@n / pass@k over n samples per item."""
    return summarize_scores(bench, item_scores(bench, items, greedy, samples, timeout=timeout))


def item_scores(bench: Benchmark, items: Sequence[Item], greedy: Sequence[str] | None,
                samples: Sequence[Sequence[str]] | None, *, timeout: float = 10.0) -> dict[str, Any]:
    """Per item: whether the greedy response is right (`greedy_correct`), how many of the n samples are
    (`sample_correct_counts`, with `num_samples`); JSON-able, so the shares of several processes join by concatenation."""
    from capo_jax.rewards.verify import score

    refs = [it.reference for it in items]
    out: dict[str, Any] = {}
    if greedy is not None:
        out["greedy_correct"] = score(list(greedy), refs, timeout=timeout, answer_format=bench.answer_format).astype(int).tolist()
    if samples is not None:
        n = len(samples[0]) if samples else 0
        if any(len(s) != n for s in samples) or len(samples) != len(items):
            raise ValueError("samples must hold the same number of responses for every item")
        flat = score([r for s in samples for r in s], [r for r in refs for _ in range(n)], timeout=timeout,
                     answer_format=bench.answer_format).reshape(len(items), n)
        out["num_samples"] = n
        out["sample_correct_counts"] = flat.sum(axis=1).astype(int).tolist()
    return out


def summarize_scores(bench: Benchmark, scores: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's metrics from `item_scores`: pass@1 greedy, avg@n and the unbiased pass@k."""
    size = len(scores.get("greedy_correct", scores.get("sample_correct_counts", [])))
    out: dict[str, Any] = {"num_items": size, "answer_format": bench.answer_format}
    if "greedy_correct" in scores:
        out["greedy_correct"] = list(scores["greedy_correct"])
        out["pass@1_greedy"] = float(np.mean(scores["greedy_correct"]))
    if "sample_correct_counts" in scores:
        n, counts = int(scores["num_samples"]), [int(c) for c in scores["sample_correct_counts"]]
        out["num_samples"] = n
        out["sample_correct_counts"] = counts
        out[f"avg@{n}"] = float(np.sum(counts) / (n * len(counts)))
        for k in ks_for(n):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in counts]))
    return out


def is_workdir(path: str) -> bool:
    """Whether `path` is a capo_jax training workdir (it holds policy_hf/config.json) rather than a model folder."""
    from capo_jax.checkpoint import POLICY_HF_DIR

    return os.path.isfile(os.path.join(path, POLICY_HF_DIR, "config.json"))


DEFAULT_MAX_NEW_TOKENS = 1024  # response budget of a Hugging Face folder (a workdir's comes from its config)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How prompts are written and how long responses may be: from the command line, else the run's stored config."""

    template: str  # "" = each benchmark's own default
    template_answer_format: str  # "" = the template applies to every benchmark; else only to those of this answer format
    use_chat_template: bool
    system_prompt: str
    max_new_tokens: int
    world: dict | None  # the arithmetic world's knobs (None: the defaults)


def benchmark_template(ps: PromptSettings, bench: Benchmark) -> str:
    """The template a benchmark is prompted with: the given or inherited one where it fits the benchmark's answer
    format (a math run's template asks for a boxed number, wrong for a multiple-choice set), else the benchmark's own."""
    fits = not ps.template_answer_format or bench.answer_format == ps.template_answer_format
    return ps.template if ps.template and fits else bench.template


def prompt_settings(args: argparse.Namespace, run: dict | None) -> PromptSettings:
    """Resolve the prompt settings: a command-line value wins; else the training run's (`run`: its config.json); else defaults.

    A command-line template has its escapes read (`\\n` -> newline)."""
    data = (run or {}).get("data", {})
    budget = int((run or {}).get("eval", {}).get("max_new_tokens", 0) or 0) or int((run or {}).get("rollout", {}).get("max_new_tokens", 0) or 0)
    return PromptSettings(
        template=read_escapes(args.template) if args.template else str(data.get("template", "") or ""),
        # a training run's template asks for its own answer format (math: a boxed answer): keep it off the others
        template_answer_format="" if args.template else str((run or {}).get("reward", {}).get("answer_format", "math")),
        use_chat_template=bool(data.get("use_chat_template", False)) if args.use_chat_template is None else args.use_chat_template,
        system_prompt=str(data.get("system_prompt", "") or "") if args.system_prompt is None else args.system_prompt,
        max_new_tokens=args.max_new_tokens or budget or DEFAULT_MAX_NEW_TOKENS,
        world=dict(data["world"]) if isinstance(data.get("world"), dict) else None,
    )


def load_model(path: str, *, step: int | None = None, dtype: str = "float32"):
    """(model, tokenizer, step) from a Hugging Face folder (step None), or a training workdir's orbax checkpoint."""
    from transformers import AutoTokenizer

    from capo_jax.export import POLICY_HF_DIR, load_policy

    if is_workdir(path):  # (a workdir's own config.json is the run's)
        model, step = load_policy(path, step, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(os.path.join(path, POLICY_HF_DIR)), int(step)
    if os.path.isfile(os.path.join(path, "config.json")):
        from capo_jax.models import from_pretrained

        return from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path), None
    raise ValueError(f"--model {path!r} holds neither config.json (a Hugging Face folder) nor "
                     f"{POLICY_HF_DIR}/config.json (a capo_jax training workdir)")


def _generate(model, tok, prompts: list[list[int]], params, seed: int, batch_size: int, mesh,
              first: int = 0) -> list[list[str]]:
    """Decoded responses, `params.n` per prompt, in batches of `batch_size` prompts. Prompt i samples from keys of
    (seed, first + i): its index in the whole benchmark, so any split of the items (batches, processes) draws the
    same responses."""
    from capo_jax.sampling import generate

    eos = tok.eos_token_id
    if eos is not None and not params.ignore_eos:
        params = dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids) + (int(eos),))
    stops = set(params.stop_token_ids) | set(np.atleast_1d(model.config.eos_token_id or []).tolist())
    out: list[list[str]] = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        res = generate(model, chunk, params, seed, mesh, prompt_index=range(first + b, first + b + len(chunk)))
        texts = []
        for row, length in zip(res.tokens, res.lengths):
            ids = [int(t) for t in row[: int(length)]]
            if ids and ids[-1] in stops:
                ids = ids[:-1]
            texts.append(tok.decode(ids, skip_special_tokens=True))
        out.extend(texts[i * params.n : (i + 1) * params.n] for i in range(len(texts) // params.n))
    return out


def _table(results: dict[str, dict[str, Any]]) -> str:
    cols = []
    for r in results.values():
        for key in r:
            if (key.startswith("pass@") or key.startswith("avg@")) and key not in cols:
                cols.append(key)
    head = f"{'benchmark':<16}{'items':>7}" + "".join(f"{c:>14}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        vals = "".join(f"{100 * r[c]:>13.1f}%" if c in r else f"{'-':>14}" for c in cols)
        lines.append(f"{name:<16}{r['num_items']:>7}{vals}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m capo_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder, or a training workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    p.add_argument("--benchmarks", default="math500,gsm8k,aime24,amc23",
                   help=f"comma list of {sorted(REGISTRY) + [ARITHMETIC]} or file:<path>")
    p.add_argument("--data_dir", default="", help="folder with <benchmark>.jsonl/.json/.parquet (else the hub)")
    p.add_argument("--question_field", default="question", help="question field of file: benchmarks")
    p.add_argument("--answer_field", default="answer", help="answer field of file: benchmarks")
    p.add_argument("--answer_format", default="math", choices=("math", "choice"), help="for file: benchmarks")
    p.add_argument("--reference_format", default="raw", choices=("raw", "gsm8k", "boxed"), help="for file: benchmarks")
    p.add_argument("--template", default="", help="prompt format string with {question} (\\n reads as a newline); "
                   "default: a workdir's training template, else each benchmark's own")
    p.add_argument("--use_chat_template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts with the tokenizer's chat template (default: a workdir's training setting, else off)")
    p.add_argument("--system_prompt", default=None, help="system message for the chat template (default: a workdir's, else none)")
    p.add_argument("--limit", type=int, default=0, help="first N items of each benchmark (0 = all)")
    p.add_argument("--greedy", type=int, default=1, choices=(0, 1), help="1: greedy pass@1")
    p.add_argument("--num_samples", type=int, default=0, help="n sampled responses per item for avg@n / pass@k (0 = none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--max_new_tokens", type=int, default=0,
                   help=f"response budget (0: a workdir's evaluation budget, else {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--max_prompt_tokens", type=int, default=2048, help="longer prompts are skipped and counted")
    p.add_argument("--batch_size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--data_parallel", type=int, default=1, help="devices to spread rows over (-1: all; 1: no mesh)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    p.add_argument("--distributed", default="auto", choices=("auto", "on", "off"),
                   help="join a multi-process job (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a "
                   "TPU pod's metadata); each process scores its share of the items, process 0 writes the report")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--timeout", type=float, default=10.0, help="per-answer verification deadline, seconds")
    p.add_argument("--output", default="eval_results.json", help="JSON file for the results")
    p.add_argument("--save_responses", action="store_true", help="also keep every response in the JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation described by `argv`; returns the JSON-able results it wrote."""
    silence_torch_advisory()
    args = _parser().parse_args(argv)
    if not args.greedy and args.num_samples <= 0:
        raise SystemExit("nothing to do: pass --greedy 1 and/or --num_samples N")
    from capo_jax.checkpoint import load_run_config

    run = load_run_config(args.model) if is_workdir(args.model) else None
    ps = prompt_settings(args, run)
    if ps.template:
        check_template(ps.template)
        warning = literal_newline_warning(ps.template)
        if warning:
            print(f"[evaluate] warning: {warning}", file=sys.stderr, flush=True)
    if run is not None:
        print(f"[evaluate] prompt template, chat settings, response budget ({ps.max_new_tokens}) and arithmetic world "
              f"not given here come from {os.path.join(args.model, 'config.json')}", flush=True)
    from capo_jax.sampling import SamplingParams

    from capo_jax import multihost
    from capo_jax.config import ConfigError
    from capo_jax.distributed import initialize

    try:
        initialize(args.distributed)  # before anything touches a device
    except ConfigError as exc:
        raise SystemExit(f"evaluate: {exc}") from None
    lead = multihost.is_lead()
    t0 = time.perf_counter()
    from capo_jax.checkpoint import CheckpointError

    try:
        model, tok, step = load_model(args.model, step=args.step, dtype=args.dtype)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    mesh = None
    if args.data_parallel != 1:
        import jax

        from capo_jax.parallel import make_mesh

        local = jax.local_devices()  # each process samples its share alone
        n = len(local) if args.data_parallel == -1 else args.data_parallel
        if not 1 <= n <= len(local):
            raise SystemExit(f"--data_parallel {args.data_parallel}: this host has {len(local)} devices")
        mesh = make_mesh(data=n, devices=local[:n])
    where = args.model if step is None else f"{args.model} (checkpoint step {step})"
    print(f"[evaluate] loaded {where} in {time.perf_counter() - t0:.1f}s", flush=True)
    results: dict[str, dict[str, Any]] = {}
    responses: dict[str, Any] = {}
    for spec in [s.strip() for s in args.benchmarks.split(",") if s.strip()]:
        tb = time.perf_counter()
        if spec.startswith("file:"):
            bench, items, skipped = local_benchmark(
                spec[5:], question_field=args.question_field, answer_field=args.answer_field,
                answer_format=args.answer_format, reference_format=args.reference_format, limit=args.limit)
        else:
            bench, items, skipped = load_benchmark(spec, data_dir=args.data_dir, limit=args.limit, seed=args.seed,
                                                   world=ps.world)
        template = benchmark_template(ps, bench)
        prompts, kept = [], []
        for it in items:
            text = render_prompt(it.question, template, tokenizer=tok, use_chat_template=ps.use_chat_template,
                                 system_prompt=ps.system_prompt)
            ids = encode_prompt(tok, text, use_chat_template=ps.use_chat_template)
            if len(ids) <= args.max_prompt_tokens:
                prompts.append(ids)
                kept.append(it)
        too_long = len(items) - len(kept)
        if not kept:
            raise SystemExit(f"benchmark {bench.name}: every prompt is longer than --max_prompt_tokens={args.max_prompt_tokens}")
        lo, hi = multihost.share(len(kept))  # this process's items (all of them on one process)
        greedy = samples = None  # this share's responses (an empty share: none)
        if args.greedy:
            params = SamplingParams(n=1, temperature=0.0, max_new_tokens=ps.max_new_tokens)
            greedy = [r[0] for r in _generate(model, tok, prompts[lo:hi], params, args.seed, args.batch_size, mesh, lo)]
        if args.num_samples > 0:
            params = SamplingParams(n=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=ps.max_new_tokens)
            samples = _generate(model, tok, prompts[lo:hi], params, args.seed + 1, args.batch_size, mesh, lo)
        scores = item_scores(bench, kept[lo:hi], greedy, samples, timeout=args.timeout)
        if multihost.process_count() > 1:  # every process's share, in item order
            import jax

            lists = {k: v for k, v in scores.items() if isinstance(v, list)}
            if args.save_responses:
                lists.update(greedy_texts=greedy or [], sample_texts=samples or [])
            joined = multihost.gather_lists(lists)
            scores.update({k: joined[k] for k in scores if k in joined})
            if samples is not None:
                scores["num_samples"] = args.num_samples  # an empty share could not tell
            if args.save_responses:
                greedy = None if greedy is None else joined["greedy_texts"]
                samples = None if samples is None else joined["sample_texts"]
            print(f"[evaluate] process {jax.process_index()} scored items {lo}..{hi - 1} of {len(kept)}",
                  flush=True)
        r = summarize_scores(bench, scores)
        r.update(domain=bench.domain, skipped_malformed=skipped, skipped_too_long=too_long, template=template,
                 use_chat_template=ps.use_chat_template, max_new_tokens=ps.max_new_tokens, seconds=time.perf_counter() - tb)
        results[bench.name] = r
        if args.save_responses:
            responses[bench.name] = [
                {"question": it.question, "reference": it.reference,
                 **({"greedy": greedy[i]} if greedy is not None else {}),
                 **({"samples": samples[i]} if samples is not None else {})}
                for i, it in enumerate(kept)]
        shown = {k: round(v, 4) for k, v in r.items() if k.startswith(("pass@", "avg@"))}
        if lead:
            print(f"[evaluate] {bench.name}: {len(kept)} items {shown} ({r['seconds']:.1f}s)", flush=True)
    if lead:
        print(_table(results))
    report = {"model": args.model, "step": step, "settings": vars(args), "results": results}
    if responses:
        report["responses"] = responses
    if args.output and lead:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        print(f"[evaluate] wrote {args.output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
