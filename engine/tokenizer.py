"""SentencePiece tokenizer with Mistral chat templates and streaming detokenization.

Two chat formats are supported:

* ``"mistral"`` is ``mistral_common``'s own encoding (engine/chat_format.py) for the file's
  tokenizer version: from its name (``tokenizer.model.v3``), else from its pieces (``[INST]``
  a control piece: v2+; 32,768 pieces: v3, Mixtral-8x22B's, with tool calls; otherwise v1,
  Mixtral-8x7B's, without).
* ``"llama2-sys"`` wraps the system prompt Llama-2 style inside the first user turn.
"""

import codecs
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from mistral_common.tokens.tokenizers.base import TokenizerVersion
from pydantic import BaseModel, ValidationError
from sentencepiece import SentencePieceProcessor

from engine.chat_format import ChatTemplateError, MistralChat
from engine.config import ChatTemplate


# Prompt tokens kept as decoding context in continuation mode; a handful is enough
# for SentencePiece, whose only context effect is dropping the first piece's space.
_CONTEXT_TOKENS = 4
_VERSIONED_NAME = re.compile(r"tokenizer\.model\.v(\d+)(m\d+)?")
_VERSION_SUFFIX = re.compile(r"\.model\.v(\d+)(m\d+)?$")  # also mistral_common's own file names
_SPACE = "\u2581"  # SentencePiece's word-boundary mark


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class IncrementalDetokenizer:
    """Turns a stream of output ids into text deltas at O(window) cost per step.

    Decodes only a small window of ids: the ids emitted by the previous step (the
    context, vLLM's ``prefix_offset``..``read_offset``) plus the ids not yet emitted,
    and returns what the new ids add to the context's text. Control ids are dropped
    because they decode to nothing and would otherwise become a context that
    SentencePiece treats as the start of text.
    """

    def __init__(self, sp: SentencePieceProcessor, plain_text: Sequence[str | None],
                 context_ids: Sequence[int]) -> None:
        self._sp = sp
        self._plain_text = plain_text  # per id: its text where one id after any context adds exactly that
        self._ids = [i for i in context_ids if not sp.IsControl(i)][-_CONTEXT_TOKENS:]
        self._read_offset = len(self._ids)  # ids before this are context, already emitted
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def step(self, new_ids: Sequence[int]) -> str:
        """Returns the text added by ``new_ids``; "" while a character is incomplete."""
        # NOTE: a decode step's usual case, one plain piece after emitted context, costs a table
        # read instead of two Decode calls (~7 us a token here, per stream per step): SentencePiece
        # only drops the space of a text's first piece, and a plain piece after context adds its
        # own text, "\u2581" as a space (checked against Decode for every piece of both vocabularies).
        if len(new_ids) == 1 and self._read_offset == len(self._ids) > 0:
            text = self._plain_text[new_ids[0]]
            if text is not None:
                self._ids = [new_ids[0]]
                self._read_offset = 1
                self._chunks.append(text)
                return text
        self._ids.extend(i for i in new_ids if not self._sp.IsControl(i))
        if self._read_offset == len(self._ids) or self._ends_mid_character():
            return ""
        context_text = self._sp.Decode(self._ids[: self._read_offset])
        delta = self._sp.Decode(self._ids)[len(context_text) :]
        # The ids just read become the only context for the next step.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._chunks.append(delta)
        return delta

    def _ends_mid_character(self) -> bool:
        # Byte-fallback pieces (<0xF0>...) split a character across ids; hold back
        # only a genuinely incomplete UTF-8 tail so invalid bytes still get emitted.
        tail = bytearray()
        for i in reversed(self._ids):
            if not self._sp.IsByte(i):
                break
            tail.insert(0, int(self._sp.IdToPiece(i)[1:-1], 16))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(bytes(tail), final=False)
        return bool(decoder.getstate()[0])


class Tokenizer:
    """A SentencePiece model plus a chat template."""

    def __init__(self, model_file: str | Path, chat_template: ChatTemplate = "mistral") -> None:
        if chat_template not in ("mistral", "llama2-sys"):
            raise ValueError(f"unknown chat template {chat_template!r}; expected 'mistral' or 'llama2-sys'")
        self._sp = SentencePieceProcessor(model_file=str(model_file))
        self.chat_template: ChatTemplate = chat_template
        begin, end = self._sp.PieceToId("[INST]"), self._sp.PieceToId("[/INST]")
        # v2+ files carry [INST]/[/INST] as control pieces; in v1 they are plain text.
        self._inst_ids: tuple[int, int] | None = (
            (begin, end) if self._sp.IsControl(begin) and self._sp.IsControl(end) else None
        )
        self._mistral = MistralChat(Path(model_file), self._version(Path(model_file))) if chat_template == "mistral" \
            else None

    def _version(self, model_file: Path) -> TokenizerVersion:
        if match := _VERSION_SUFFIX.search(model_file.name):
            return TokenizerVersion(f"v{match.group(1)}")
        if self._inst_ids is None:
            return TokenizerVersion.v1
        return TokenizerVersion.v3 if self.vocab_size == 32768 else TokenizerVersion.v2

    def tool_call_grammar(self, tools: list[dict[str, Any]], name: str | None = None, parallel: bool = True) -> str:
        """The grammar of a reply made only of calls to `tools` (or to the function `name`): how
        `tool_choice: "required"` or a named function is enforced (engine/chat_format.py)."""
        if self._mistral is None:
            raise ChatTemplateError("the llama2-sys chat template has no tool format")
        return self._mistral.tool_call_grammar(tools, name, parallel)

    @property
    def tool_calls_id(self) -> int | None:
        """The control id that starts the model's tool calls; None without a tool format."""
        return None if self._mistral is None else self._mistral.tool_calls_id

    @classmethod
    def from_dir(cls, model_dir: str | Path, chat_template: ChatTemplate = "mistral") -> "Tokenizer":
        """Loads ``tokenizer.model``, else the newest Mistral-style ``tokenizer.model.v*``."""
        folder = Path(model_dir)
        if (folder / "tokenizer.model").is_file():
            return cls(folder / "tokenizer.model", chat_template)
        versioned = [
            (int(match.group(1)), path)
            for path in folder.glob("tokenizer.model.v*")
            if (match := _VERSIONED_NAME.fullmatch(path.name)) and path.is_file()
        ]
        if not versioned:
            raise FileNotFoundError(
                f"no tokenizer file in {folder}: looked for tokenizer.model, tokenizer.model.v1, "
                "tokenizer.model.v3 and other tokenizer.model.v*"
            )
        return cls(max(versioned)[1], chat_template)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids: list[int] = self._sp.Encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes to text; bos, eos and other control tokens produce nothing."""
        return self._sp.Decode(list(ids))

    def token_bytes(self) -> list[bytes | None]:
        """What each id adds to the output's bytes; None for control ids (bos, eos, [INST], ...)."""
        sp = self._sp
        out: list[bytes | None] = []
        for i in range(sp.GetPieceSize()):
            piece = sp.IdToPiece(i)
            if sp.IsControl(i) or sp.IsUnknown(i):
                out.append(None)
            elif sp.IsByte(i):
                out.append(bytes([int(piece[3:-1], 16)]))  # "<0xAB>"
            else:
                out.append(piece.replace(_SPACE, " ").encode())
        return out

    def encode_exact(self, text: str) -> list[int]:
        """Ids whose `token_bytes` add up to exactly `text`: `encode` without SentencePiece's dummy
        leading space (a grammar engine compares bytes, and "{" is not " {")."""
        ids: list[int] = self._sp.Encode(text)
        first = self._sp.IdToPiece(ids[0]) if ids else ""
        if not first.startswith(_SPACE):
            return ids
        rest = first[len(_SPACE):]  # the first piece without the space SentencePiece put in front
        plain = self._sp.PieceToId(rest) if rest else None
        if plain is None or (plain != self._sp.unk_id() and self._sp.IdToPiece(plain) == rest):
            return ([plain] if plain is not None else []) + ids[1:]
        return [self._sp.PieceToId(f"<0x{b:02X}>") for b in rest.encode()] + ids[1:]  # byte fallback

    @cached_property
    def _plain_text(self) -> list[str | None]:
        """Each id's text for the streaming detokenizer's table path; None where the text depends on
        the neighbours (byte fallback) or is not the piece (control, unknown). Built on first use:
        an engine's front, which only encodes, never pays for it."""
        sp = self._sp
        pieces = sp.IdToPiece(list(range(sp.GetPieceSize())))
        return [None if sp.IsControl(i) or sp.IsByte(i) or sp.IsUnknown(i) or sp.IsUnused(i)
                else piece.replace(_SPACE, " ") for i, piece in enumerate(pieces)]

    def detokenizer(self, prompt_ids: Sequence[int], continuation: bool) -> IncrementalDetokenizer:
        """Streams output text for a request.

        ``continuation=True`` yields how the output continues the prompt (a first token
        "▁Paris" gives " Paris"); ``continuation=False`` yields ``decode(output_ids)``,
        whose first leading space is dropped like SentencePiece does.
        """
        return IncrementalDetokenizer(self._sp, self._plain_text, prompt_ids if continuation else ())

    def apply_chat_template(
        self, messages: Sequence[ChatMessage | dict], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Renders a conversation (OpenAI-style message dicts, or ChatMessage) as prompt ids.

        "mistral": mistral_common's own encoding for the file's version (engine/chat_format.py),
        tools, tool calls and tool results included where the version has a tool format.

        "llama2-sys" wraps the system prompt Llama-2 style in the first user turn; for a v1 file
        it decodes to ``"[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 [INST] U2 [/INST]"`` (each
        quoted segment encoded on its own; v2/v3 files use [INST]/[/INST] control ids)::

            <s> "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST]" "A1" </s> "[INST] U2 [/INST]"

        With ``add_generation_prompt=False`` the conversation may end with an assistant
        reply, which is then closed with eos (training-style full encoding).
        """
        dicts = [m.model_dump() if isinstance(m, ChatMessage) else m for m in messages]
        plain = not tools and not any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                      for m in dicts)
        if plain or self._mistral is None:
            # Our own checks first: they name the usual mistakes plainly (and llama2-sys needs them).
            system, turns = _validate(messages, add_generation_prompt)
        if self._mistral is not None:
            return self._mistral.encode(dicts, tools, add_generation_prompt)
        if tools:
            raise ChatTemplateError("the llama2-sys chat template has no tool format")
        ids = [self.bos_id]
        for i, message in enumerate(turns):
            if message.role == "assistant":
                ids += self._encode_assistant(message.content)
                continue
            content = message.content
            if system and i == 0:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            ids += self._encode_user(content)
        return ids

    def _encode_user(self, content: str) -> list[int]:
        if self._inst_ids is None:
            return self.encode(f"[INST] {content} [/INST]")
        begin, end = self._inst_ids
        return [begin, *self.encode(content), end]

    def _encode_assistant(self, content: str) -> list[int]:
        # mistral_common strips trailing spaces from replies from v2 on, not in v1.
        text = content.rstrip(" ") if self._inst_ids else content
        return [*self.encode(text), self.eos_id]


def _validate(
    messages: Sequence[ChatMessage | dict], add_generation_prompt: bool
) -> tuple[str, list[ChatMessage]]:
    """Returns the system prompt ("" if none) and the user/assistant turns."""
    if not messages:
        raise ChatTemplateError("conversation is empty: at least one user message is required")
    parsed: list[ChatMessage] = []
    for index, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            parsed.append(message)
            continue
        try:
            parsed.append(ChatMessage.model_validate(message))
        except ValidationError as error:
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("system", "user", "assistant"):
                raise ChatTemplateError(
                    f"message {index} has unknown role {role!r}; expected 'system', 'user' or 'assistant'"
                ) from error
            raise ChatTemplateError(f"message {index} is invalid: {error}") from error
    # Like mistral_common, an empty system prompt means no system prompt.
    system = parsed[0].content if parsed[0].role == "system" else ""
    offset = 1 if parsed[0].role == "system" else 0
    turns = parsed[offset:]
    for position, message in enumerate(turns):
        index = position + offset
        if message.role == "system":
            raise ChatTemplateError(
                f"system message at index {index}: only the first message may be a system message"
            )
        expected = "user" if position % 2 == 0 else "assistant"
        if message.role != expected:
            raise ChatTemplateError(
                f"roles must alternate user/assistant after an optional system message: "
                f"message {index} is {message.role!r}, expected {expected!r}"
            )
        if message.role == "assistant" and not message.content:
            raise ChatTemplateError(f"assistant message {index} has empty content")
    if not turns:
        raise ChatTemplateError("conversation has no user message")
    if add_generation_prompt and turns[-1].role == "assistant":
        raise ChatTemplateError(
            "last message is from the assistant; a generation prompt needs a final user message "
            "(pass add_generation_prompt=False to encode a finished conversation)"
        )
    return system, turns
