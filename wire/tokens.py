"""The tiny tokenizer sessctl ships, read with no dependency: ids to text and
back, and its chat template rendered in plain Python. No I/O beyond reading
the package's own files once.

A session server that tokenizes its prompts and calls SGLang's native
``/generate`` with ``input_ids`` sends the chaos upstream numbers, not text.
Point that server's tokenizer path at ``TOKENIZER_DIR`` (a Hugging Face
tokenizer directory: a byte-level BPE with a ChatML chat template), and the
upstream reads the step marker back out of the ids it is sent.

Byte-level: every id stands for bytes, so any ids decode, and any text encodes
(the encoding here applies the merges as ``tokenizers`` does, word by word; a
server that splits words another way still decodes to the same text).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
"""Give a session server this directory as its tokenizer (``hf_checkpoint``,
``tokenizer_path``)."""

END_OF_TURN = "<|im_end|>"

# GPT-2's pre-tokenizer, with \p{L} and \p{N} spelled for Python's re.
_WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters, which byte-level BPE uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@dataclass(frozen=True)
class Tokenizer:
    vocab: dict[str, int]
    ids: dict[int, str]
    ranks: dict[tuple[str, str], int]
    special: dict[str, int]
    _merged: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        """The text of ``ids`` (special tokens as their text, unless skipped);
        an unknown id decodes to nothing."""
        decoder = _BYTE_DECODER
        out: list[str] = []
        pending = bytearray()
        for token_id in ids:
            token = self.ids.get(token_id)
            if token is None:
                continue
            if token in self.special:
                if not skip_special:
                    # A skipped token leaves the bytes around it joined, as
                    # ``tokenizers`` decodes them.
                    out.append(pending.decode("utf-8", errors="replace"))
                    pending.clear()
                    out.append(token)
                continue
            pending.extend(decoder[c] for c in token if c in decoder)
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        """Ids for ``text``; special tokens in it become their ids."""
        ids: list[int] = []
        pattern = "(" + "|".join(re.escape(s) for s in self.special) + ")"
        for piece in re.split(pattern, text):
            if piece in self.special:
                ids.append(self.special[piece])
                continue
            for word in _WORDS.findall(piece):
                mapped = "".join(_BYTE_ENCODER[b] for b in word.encode())
                ids.extend(self.vocab[t] for t in self._merge(mapped))
        return ids

    def _merge(self, word: str) -> tuple[str, ...]:
        """The word's tokens: the lowest-ranked merge first, until none applies."""
        known = self._merged.get(word)
        if known is not None:
            return known
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get((a, b), 1 << 30), i)
                for i, (a, b) in enumerate(itertools.pairwise(parts))
            ]
            rank, at = min(pairs)
            if rank == 1 << 30:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if len(self._merged) < 4096:
            self._merged[word] = tuple(parts)
        return tuple(parts)

    def token_id(self, token: str) -> int:
        return self.special.get(token, self.vocab.get(token, 0))


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


@functools.cache
def tokenizer() -> Tokenizer:
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    special = {t["content"]: t["id"] for t in data["added_tokens"] if t.get("special")}
    merges = data["model"]["merges"]
    ranks = {
        (tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))): rank
        for rank, m in enumerate(merges)
    }
    ids = {i: t for t, i in vocab.items()} | {i: t for t, i in special.items()}
    return Tokenizer(vocab, ids, ranks, special)


def render_chat(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The shipped chat template (``tokenizer_config.json``), rendered: ChatML,
    tools listed by name, tool calls as ``<tool_call>`` JSON."""
    out: list[str] = []
    if tools:
        names = "".join(" " + str(t.get("function", {}).get("name")) for t in tools)
        out.append(f"<|im_start|>system\n<tools>{names}</tools>{END_OF_TURN}\n")
    for message in messages:
        out.append(f"<|im_start|>{message.get('role')}\n")
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif content:
            out.extend(
                str(part.get("text"))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            out.append(
                f'<tool_call>{{"name": "{function.get("name")}", '
                f'"arguments": {function.get("arguments")}}}</tool_call>'
            )
        out.append(f"{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


_TOOLS = re.compile(r"<tools>([^<]*)</tools>")
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def tools_in_prompt(prompt: str) -> list[str]:
    """The tool names a rendered prompt offers (none if it lists none)."""
    found = _TOOLS.search(prompt)
    return found.group(1).split() if found else []


def tool_call_text(name: str, arguments: str) -> str:
    """A tool call as the template renders one (and Qwen's parsers read)."""
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The text before any ``<tool_call>``, and the calls in it (name, arguments
    as a JSON string), as a server parses a completion; malformed calls are text."""
    calls: list[dict[str, Any]] = []
    for found in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(found.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"name": call["name"], "arguments": json.dumps(call.get("arguments"))})
    return (text.split("<tool_call>", 1)[0] if calls else text), calls
