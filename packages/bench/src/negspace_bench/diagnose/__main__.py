"""Command line of the mechanism check (see the package doc): prints the table and writes
``diagnose.json``, ``diagnose.md`` and ``dh_per_step.png`` to ``--out``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from negspace_bench.diagnose import decode, report
from negspace_bench.diagnose.instructions import EXISTING
from negspace_bench.diagnose.measures import x_specific_ids


def default_bases() -> list[str]:
    from negspace_cli.study.spec import DEFAULT_BASES

    return [text for text, split in DEFAULT_BASES if split == "tune"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m negspace_bench.diagnose", description=__doc__)
    p.add_argument("--model", default="", help="hub id or folder; empty = the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--base", action="append", dest="bases",
                   help="a base instruction (repeatable); default: the study's tuning bases")
    p.add_argument("--existing", type=Path, help="JSON {base: [X, ...]} for bases without shipped X's")
    p.add_argument("--k", type=int, default=3, help="existing instructions per base (the run default: 3)")
    p.add_argument("--variant", action="append", dest="variants", choices=list(decode.VARIANTS),
                   help="repeatable; default: all")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--temperature", type=float, default=None, help="sampling; default: RunConfig's")
    p.add_argument("--top-p", type=float, default=None, help="sampling; default: RunConfig's")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0 = torch's default. 1 (the default) because on shared cores 2 "
                        "threads made each decode step ~4x slower here")
    p.add_argument("--out", type=Path, default=Path("docs/diagnose"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from negspace_contracts.orchestrator import RunConfig
    from negspace_models import resolve_model
    from negspace_node.engines.stopping import eos_token_ids
    from negspace_node.engines.transformers import TransformersEngine, _pad_id, load_model
    from negspace_node.settings import NodeSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bases = args.bases or default_bases()
    existing = dict(EXISTING)
    if args.existing:
        existing.update(json.loads(args.existing.read_text()))
    missing = [b for b in bases if len(existing.get(b, [])) < args.k]
    if missing:
        sys.exit(f"no {args.k} existing instructions for {missing}: give them with --existing")
    variants = [decode.VARIANTS[v] for v in (args.variants or list(decode.VARIANTS))]
    defaults = RunConfig(base_instruction="-")
    temperature = defaults.temperature if args.temperature is None else args.temperature
    top_p = defaults.top_p if args.top_p is None else args.top_p

    resolved = resolve_model(args.model)
    model, tokenizer = load_model(resolved.path, args.dtype, "cpu" if not torch.cuda.is_available() else None)
    settings = NodeSettings(model=resolved.path, dtype=args.dtype)
    renderer = decode.Renderer(TransformersEngine(settings, model=model, tokenizer=tokenizer))
    eos = eos_token_ids(tokenizer, model.config, model.generation_config)
    pad = _pad_id(tokenizer, model)
    print(f"model {resolved.name} ({model.dtype}, {model.device}); {len(bases)} bases x {len(args.seeds)} "
          f"seeds x {len(variants)} variants, scale {args.scale:g}, {args.tokens} tokens, sampling "
          f"T={temperature:g} top-p={top_p:g}", flush=True)

    units: list[dict] = []
    for base in bases:
        xs = existing[base][: args.k]
        distinct: list[list[int]] = []
        groups: list[decode.Group] = []
        for variant in variants:
            pos_text, neg_texts = decode.prompt_texts(base, xs, variant.fmt)
            pos, negs = renderer.ids(pos_text, neg_texts)
            rows = []
            for seq in [pos, *negs]:
                if seq not in distinct:
                    distinct.append(seq)
                rows.append(distinct.index(seq))
            groups.extend(decode.Group(variant, seed, rows) for seed in args.seeds)
        x_ids = [renderer.completion_ids(" ".join(x.split())) for x in xs]
        x_spec = x_specific_ids(x_ids, renderer.completion_ids(decode.prompt_texts(base, xs, None)[0]))
        t0 = time.perf_counter()
        decode.decode_base(model, distinct, groups, x_ids=x_ids, x_specific=x_spec, scale=args.scale,
                           tokens=args.tokens, temperature=temperature, top_p=top_p, eos_ids=eos, pad_id=pad)
        print(f"  {base!r}: {len(distinct)} distinct prompts, {sum(len(g.rows) for g in groups)} rows, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for g in groups:
            units.append({"base": base, "seed": g.seed, "variant": g.variant.name,
                          "text": tokenizer.decode(g.tokens, skip_special_tokens=True),
                          "means": report.unit_means(g.steps), "steps": g.steps})

    elapsed = time.perf_counter() - started
    setup = {"model": resolved.name, "dtype": str(model.dtype).replace("torch.", ""), "scale": args.scale,
             "tokens": args.tokens, "seeds": args.seeds, "k": args.k, "sampling_temperature": temperature,
             "sampling_top_p": top_p, "measured_at": "temperature 1, no top-p",
             "bootstrap": args.bootstrap, "threads": torch.get_num_threads(), "seconds": round(elapsed, 1), "bases": bases,
             "existing": {b: existing[b][: args.k] for b in bases}}
    summary = report.summarize(units, [v.name for v in variants], reps=args.bootstrap)
    report.write(args.out, summary, setup, units)
    print(report.markdown(summary, setup))
    print(f"wrote {args.out}/diagnose.json, diagnose.md, dh_per_step.png in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
