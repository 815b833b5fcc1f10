"""The `mixtral-serve` command line, run as a user runs it (the chat through a real terminal)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pexpect

from engine import LLM, LoRARequest, SamplingParams

CLI = [sys.executable, "-m", "mixtral_serve.cli"]


def test_make_checkpoint_then_generate_json(tmp_path: Path) -> None:
    out = tmp_path / "m"
    done = subprocess.run([*CLI, "make-checkpoint", "--preset", "tiny", "--layout", "mistral", "--out", str(out),
                           "--dtype", "float32"], capture_output=True, text=True, check=True)
    assert "wrote tiny checkpoint" in done.stdout and (out / "params.json").is_file()
    run = subprocess.run([*CLI, "generate", "--model", str(out), "--prompt", "The capital of France is",
                          "--max-tokens", "12", "--ignore-eos", "--json", "--dtype", "float32"],
                         capture_output=True, text=True, check=True)
    result = json.loads(run.stdout)
    llm = LLM(out, dtype="float32", cache={"kv_cache_bytes": 16 * 2**20}, load_progress=False)
    expected = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12,
                                                                       ignore_eos=True))[0]
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    assert result["finish_reason"] == "length" and result["prompt_token_ids"][0] == 1
    ids = subprocess.run([*CLI, "generate", "--model", str(out), "--prompt-token-ids", "1,415,5565",
                          "--max-tokens", "3", "--ignore-eos", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(ids.stdout)["prompt_token_ids"] == [1, 415, 5565]
    # The GPU expert kernel from the command line (Triton's interpreter on this CPU: conftest's env).
    triton = subprocess.run([*CLI, "generate", "--model", str(out), "--prompt", "The capital of France is",
                             "--max-tokens", "12", "--ignore-eos", "--json", "--dtype", "float32",
                             "--moe-backend", "triton"], capture_output=True, text=True, check=True)
    assert json.loads(triton.stdout)["token_ids"] == expected.token_ids


def test_make_adapter_then_generate_and_chat_with_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "tuned"
    made = subprocess.run([*CLI, "make-adapter", "--model", str(tiny_checkpoint), "--out", str(adapter), "--rank", "12",
                           "--targets", "q_proj", "v_proj", "w1", "w2", "--layout", "mistral", "--dtype", "float32"],
                          capture_output=True, text=True, check=True)
    assert "rank-12 mistral adapter" in made.stdout and (adapter / "lora.safetensors").is_file()
    flags = ["--model", str(tiny_checkpoint), "--max-tokens", "10", "--dtype", "float32"]

    def generate(*extra: str) -> list[int]:
        run = subprocess.run([*CLI, "generate", "--prompt", "The capital of France is", "--json", "--ignore-eos",
                              *flags, *extra],
                             capture_output=True, text=True, check=True)
        return json.loads(run.stdout)["token_ids"]

    tuned = generate("--lora", str(adapter))
    llm = LLM(tiny_checkpoint, dtype="float32", cache={"kv_cache_bytes": 16 * 2**20}, load_progress=False,
              lora={"max_loras": 1, "max_lora_rank": 12})
    want = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        lora_request=LoRARequest("tuned", str(adapter)))[0]
    assert tuned == want.token_ids and tuned != generate()
    small = subprocess.run([*CLI, "generate", "--prompt", "hi", *flags, "--lora", str(adapter), "--max-lora-rank", "8"],
                           capture_output=True, text=True)
    assert small.returncode == 2 and "rank 12, above max_lora_rank 8" in small.stderr
    missing = subprocess.run([*CLI, "generate", "--prompt", "hi", *flags, "--lora", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    chat = subprocess.run([*CLI, "chat", *flags, "--lora", str(adapter)], input="Hello\n/quit\n", capture_output=True,
                          text=True, check=True)
    assert "adapter tuned" in chat.stdout and "[context" in chat.stdout


def test_generate_rejects_overlong_request(tiny_checkpoint: Path) -> None:
    run = subprocess.run([*CLI, "generate", "--model", str(tiny_checkpoint), "--prompt", "hi",
                          "--max-tokens", "5000"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "maximum context length is 4096 tokens" in run.stderr


def test_console_chat_in_a_terminal(tiny_checkpoint: Path) -> None:
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", "--model", str(tiny_checkpoint), "--max-tokens", "8",
                                   "--system", "Be brief."], encoding="utf-8", timeout=120)
    status = re.compile(r"\[context (\d+) tokens \| (\d+) tokens, time to first token \d+ ms, [\d.]+ tokens/s\]")
    child.expect("> ")
    child.sendline("Hello there")
    child.expect(status)
    first_context = int(child.match.group(1))
    assert int(child.match.group(2)) == 8
    child.expect("> ")
    child.sendline("And again")
    child.expect(status)
    second_context = int(child.match.group(1))
    assert second_context > first_context + 8  # the first exchange is in the context
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("Hello there")
    child.expect(status)
    assert int(child.match.group(1)) == first_context
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_console_chat_survives_ctrl_c_and_a_full_context(tiny_checkpoint: Path) -> None:
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", "--model", str(tiny_checkpoint), "--max-tokens", "400",
                                   "--max-model-len", "1024", "--system", "Be brief."], encoding="utf-8", timeout=120)
    status = re.compile(r"\[context (\d+) tokens \| (\d+) tokens, time to first token \d+ ms, [\d.]+ tokens/s\]")
    child.expect("> ")
    child.sendline("Tell me a long story")
    child.expect("Tell me a long story\r\n")  # the terminal's echo
    child.expect(".")  # the answer has begun: 400 tokens take a good fraction of a second here
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(status)
    first_context, interrupted_tokens = int(child.match.group(1)), int(child.match.group(2))
    assert 0 < interrupted_tokens < 400
    # The conversation goes on, with the stopped answer in it, and outgrows the context: the
    # oldest exchanges make room, with a note, instead of failing every later turn.
    contexts, notes = [], 0
    for turn in range(6):
        child.expect("> ")
        child.sendline(f"Go on with part {turn}")
        if child.expect([r"dropped the oldest \d+ exchange", status]) == 0:
            notes += 1
            child.expect(status)
        contexts.append(int(child.match.group(1)))
    assert contexts[0] > first_context + interrupted_tokens // 2
    assert notes >= 1 and max(contexts) <= 1024 - 400
    child.expect("> ")
    child.sendintr()  # Ctrl-C at the prompt leaves, quietly
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")
