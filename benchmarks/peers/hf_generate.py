#!/usr/bin/env python3
"""Throughput of Hugging Face transformers `generate()` on CPU (peer baseline).

  python benchmarks/peers/hf_generate.py --model /tmp/bench-hf --dtype bfloat16 \\
      --batch 1 16 --prompt-len 32 --max-tokens 64

Same workload and JSON fields as vllm_offline.py: random token-id prompts
(fixed seed), greedy, exactly max_tokens new tokens (min_new_tokens = max_new_tokens,
i.e. EOS ignored), warm-up excluded, medians over --reps.

  prefill_s    generate() with max_new_tokens=1
  total_s      generate() with max_new_tokens=T
  e2e_tok_s    batch*T / total_s
  decode_tok_s batch*(T-1) / (total_s - prefill_s)
  ttft_s       generate() of ONE --ttft-len token prompt, max_new_tokens=1
"""
import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ttft-len", type=int, default=1024, help="0: skip")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    rng = np.random.RandomState(args.seed)

    @torch.inference_mode()
    def timed(n, length, max_tokens):
        ids = torch.from_numpy(rng.randint(3, vocab, size=(n, length))).long()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
        dt = time.perf_counter() - t
        return dt, out[:, length:]

    base = {"engine": "transformers", "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "model": args.model, "dtype": args.dtype,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "load_s": round(load_s, 2),
            "threads": torch.get_num_threads()}
    ttft = None
    if args.ttft_len:
        timed(1, args.ttft_len, 1)
        ttft = statistics.median(timed(1, args.ttft_len, 1)[0] for _ in range(args.reps))
    for b in args.batch:
        timed(b, args.prompt_len, args.max_tokens)  # warm-up
        pre, tot, sample = [], [], None
        for _ in range(args.reps):
            pre.append(timed(b, args.prompt_len, 1)[0])
            dt, gen = timed(b, args.prompt_len, args.max_tokens)
            assert gen.shape == (b, args.max_tokens), gen.shape
            tot.append(dt)
            sample = gen[0].tolist()
        p, t = statistics.median(pre), statistics.median(tot)
        rec = dict(base, batch=b, decode_tok_s=round(b * (args.max_tokens - 1) / max(t - p, 1e-9), 2),
                   e2e_tok_s=round(b * args.max_tokens / t, 2), prefill_s=round(p, 4), total_s=round(t, 4),
                   total_s_all=[round(x, 4) for x in tot], prefill_s_all=[round(x, 4) for x in pre],
                   ttft_s=None if ttft is None else round(ttft, 4), ttft_prompt_len=args.ttft_len or None,
                   sample_first16=sample[:16], sample_distinct=len(set(sample)))
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
