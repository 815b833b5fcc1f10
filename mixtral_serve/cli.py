"""The `mixtral-serve` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import engine_bench, lora_bench, prefix_routing_bench, serve_bench, serving_path, structured_bench
from dashboards import commands as dashboard_commands
from engine.checkpoint import DTYPES, PRESETS, write_checkpoint
from engine.config import EngineConfig
from engine.lora_adapter import TARGETS, declared_rank, write_random_adapter
from engine.lora_request import LoRARequest
from mixtral_serve import serve_command
from mixtral_serve.engine_flags import COMMAND_KV_CACHE, add_engine_flags, engine_config, given_engine_flags

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams


def _sampling_args(p: argparse.ArgumentParser) -> None:
    add_engine_flags(p, exclude=("seed",))  # --seed below is the request's
    p.set_defaults(**COMMAND_KV_CACHE)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--lora", type=Path, metavar="DIR", help="a LoRA adapter folder (PEFT or mistral-finetune layout)")


def _sampling(args: argparse.Namespace, **extra: object) -> SamplingParams:
    from engine.sampling_params import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens, **extra,
    )


def _with_adapter(args: argparse.Namespace) -> tuple[EngineConfig, LoRARequest | None]:
    """The engine config of the flags, with a slot for `--lora` (at its rank unless flags say otherwise)."""
    config = engine_config(args)
    if args.lora is None:
        return config, None
    lora = LoRARequest(args.lora.name, str(args.lora))
    given = given_engine_flags(args).get("lora", {})
    update = {"max_loras": given.get("max_loras", max(config.lora.max_loras, 1))}
    if "max_lora_rank" not in given:
        update["max_lora_rank"] = declared_rank(args.lora) or config.lora.max_lora_rank
    return config.model_copy(update={"lora": config.lora.model_copy(update=update)}), lora


def cmd_make_checkpoint(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    out = write_checkpoint(
        args.out, PRESETS[args.preset], layout=args.layout, seed=args.seed, dtype=args.dtype, shard_mb=args.shard_mb
    )
    print(f"wrote {args.preset} checkpoint ({args.layout} layout, {args.dtype}) to {out} "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_generate(args: argparse.Namespace) -> None:
    from engine.llm import LLM

    config, lora = _with_adapter(args)
    llm = LLM(config=config)
    if args.prompt_token_ids:
        prompt: str | list[int] = [int(t) for t in args.prompt_token_ids.split(",")]
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise SystemExit("error: give --prompt or --prompt-token-ids")
    t0 = time.perf_counter()
    result = llm.generate(prompt, _sampling(args, ignore_eos=args.ignore_eos), lora_request=lora)[0]
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "seconds": round(seconds, 4),
        }))
    else:
        print(result.text)
        print(f"[{len(result.token_ids)} tokens in {seconds:.2f}s, finish reason: {result.finish_reason}]",
              file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from engine.llm_engine import LLMEngine
    from mixtral_serve.console_chat import run_chat

    config, lora = _with_adapter(args)
    run_chat(LLMEngine(config), _sampling(args), args.system, lora=lora)


def cmd_make_adapter(args: argparse.Namespace) -> None:
    out = write_random_adapter(args.model, args.out, args.rank, tuple(args.targets), args.layout, args.seed,
                               DTYPES[args.dtype])
    print(f"wrote a rank-{args.rank} {args.layout} adapter on {', '.join(args.targets)} for {args.model} to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral-serve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine start-up details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the Serve application (OpenAI API per tier) on this machine")
    serve_command.add_arguments(p)
    p.set_defaults(func=serve_command.main)

    p = sub.add_parser("make-checkpoint", help="write a random-weight Mixtral checkpoint in a real layout")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layout", choices=["hf", "mistral"], default="hf")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--shard-mb", type=int, help="split Hugging Face weights into shards of this size")
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("make-adapter", help="write a random LoRA adapter for a checkpoint (tests, demos)")
    p.add_argument("--model", type=Path, required=True, help="the base checkpoint's folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--layout", choices=["peft", "mistral"], default="peft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.set_defaults(func=cmd_make_adapter)

    p = sub.add_parser("generate", help="complete one prompt")
    _sampling_args(p)
    p.add_argument("--prompt")
    p.add_argument("--prompt-token-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive console chat")
    _sampling_args(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="speed benchmarks").add_subparsers(dest="bench", required=True)
    benchmarks = (
        ("engine", engine_bench, "decode tokens/s and TTFT of the engine next to its peers"),
        ("serve", serve_bench, "load-test an OpenAI-compatible server: latency, tokens/s, goodput"),
        ("serving-path", serving_path, "tokens/s and TTFT of each layer: engine, async engine, Serve, vLLM"),
        ("structured", structured_bench, "decode tokens/s with every request JSON-schema constrained vs none"),
        ("lora", lora_bench, "decode tokens/s with 0, 1, 4, 16 distinct LoRA adapters in the batch"),
        ("prefix-routing", prefix_routing_bench, "multi-turn chat on two replicas: prefix-affinity vs Serve's router"),
    )
    for name, module, text in benchmarks:
        p = bench.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.main)

    dashboard_commands.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
