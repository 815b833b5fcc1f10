#!/usr/bin/env python3
"""Offline throughput of vLLM's CPU build on a Hugging Face checkpoint (peer baseline).

Run it with the vLLM venv's python, NOT the project's python:

  VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
  /opt/vllm-venv/bin/python benchmarks/peers/vllm_offline.py \\
      --model /tmp/bench-hf --dtype bfloat16 --batch 1 16 64 --prompt-len 32 --max-tokens 64

Prints one JSON line per batch size. Workload: `batch` random token-id prompts
(fixed seed, ids in [3, vocab)), greedy, ignore_eos, exactly max_tokens new
tokens each. Each measurement is preceded by a warm-up run of the same shape.

  prefill_s    wall time of generate() with max_tokens=1 (prefill + 1 token)
  total_s      wall time of generate() with max_tokens=T
  e2e_tok_s    batch*T / total_s                       (all generated tokens / wall time)
  decode_tok_s batch*(T-1) / (total_s - prefill_s)     (decode phase only, prefill excluded)
  ttft_s       wall time of generate() for ONE --ttft-len token prompt, max_tokens=1
Medians over --reps repetitions (fresh random prompts each time, so the prefix
cache never hits).
"""
import argparse
import json
import os
import statistics
import sys
import time

# Must be set before vllm is imported: use both cores (default is one).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ttft-len", type=int, default=1024, help="prompt length for the TTFT test (0: skip)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--extra", default="{}", help="JSON dict of extra LLM(...) kwargs")
    args = ap.parse_args()

    import numpy as np
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
              max_model_len=args.max_model_len, max_num_seqs=max(256, max(args.batch)), seed=args.seed,
              **json.loads(args.extra))
    load_s = time.perf_counter() - t0
    vocab = llm.get_tokenizer().vocab_size if hasattr(llm.get_tokenizer(), "vocab_size") else 32000
    rng = np.random.RandomState(args.seed)

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=rng.randint(3, vocab, size=length).tolist()) for _ in range(n)]

    def timed(n, length, max_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ps = prompts(n, length)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        return dt, ntok, outs

    base = {"engine": "vllm-cpu", "vllm_version": vllm.__version__, "model": args.model, "dtype": args.dtype,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "load_s": round(load_s, 2),
            "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}

    ttft = None
    if args.ttft_len:
        timed(1, args.ttft_len, 1)  # warm-up
        ttfts = [timed(1, args.ttft_len, 1)[0] for _ in range(args.reps)]
        ttft = statistics.median(ttfts)

    for b in args.batch:
        timed(b, args.prompt_len, args.max_tokens)  # warm-up (same shape)
        pre, tot, sample = [], [], None
        for _ in range(args.reps):
            pre.append(timed(b, args.prompt_len, 1)[0])
            dt, ntok, outs = timed(b, args.prompt_len, args.max_tokens)
            assert ntok == b * args.max_tokens, (ntok, b * args.max_tokens)
            tot.append(dt)
            sample = list(outs[0].outputs[0].token_ids)
        p, t = statistics.median(pre), statistics.median(tot)
        rec = dict(base, batch=b, decode_tok_s=round(b * (args.max_tokens - 1) / max(t - p, 1e-9), 2),
                   e2e_tok_s=round(b * args.max_tokens / t, 2), prefill_s=round(p, 4), total_s=round(t, 4),
                   total_s_all=[round(x, 4) for x in tot], prefill_s_all=[round(x, 4) for x in pre],
                   ttft_s=None if ttft is None else round(ttft, 4), ttft_prompt_len=args.ttft_len or None,
                   sample_first16=sample[:16], sample_distinct=len(set(sample)))
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
